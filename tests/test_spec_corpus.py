"""Every bad input gets one clear error: the tests/specs/bad/ corpus and a table of bad command lines of
``python -m orchestrator.sweep`` each end with exit 2, ONE ``error: ...`` line naming the offending key
(never a traceback), no output directory and no Ray; and a property-based fuzz of the spec loader:
any mutation of a valid spec either loads or is a one-line ConfigError naming a key path of the input."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fewshot.errors import ConfigError
from orchestrator.spec import SweepSpec, _UniqueKeyLoader, load_spec, parse_spec
from orchestrator.sweep import main

ROOT = Path(__file__).resolve().parents[1]
BAD = sorted((Path(__file__).parent / "specs" / "bad").glob("*.yaml"))
DEMO = str(ROOT / "search_spaces" / "demo.yaml")


def _expect(path: Path) -> str:
    first = path.read_text(encoding="utf-8").splitlines()[0]
    assert first.startswith("# expect: "), path
    return first[len("# expect: ") :]


def _names(msg: str, expect: str) -> bool:
    """A key path must *start* the message (``shots[0]: ...``); a phrase (with a space) must occur in it."""
    return expect in msg if " " in expect else msg.startswith(f"{expect}:")


def _run_cli(argv, capsys, out: Path) -> str:
    """Run the sweep CLI in-process; assert exit 2, one ``error:`` line, no traceback, no output dir, no Ray.
    Standard output holds nothing but, when the data check ran, its progress lines."""
    import ray

    rc = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert rc == 2, captured
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err
    assert not re.search(r"[\x00-\x09\x0b-\x1f\x7f-\x9f]", captured.err), f"raw control character: {captured.err!r}"
    progress = [ln for ln in captured.out.splitlines() if not (ln.startswith("checking data: ") or ln.startswith("  "))]
    assert progress == [], captured.out
    assert not out.exists(), f"{out} was left behind"
    assert not ray.is_initialized()
    return lines[0][len("error: ") :]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.2", 0))
        return sock.getsockname()[1]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "my-notes.txt").write_text("a user's folder")
    return path


# --- the YAML corpus -------------------------------------------------------------------------------


def test_corpus_size():
    assert len(BAD) >= 45
    assert len(BAD) + len(CLI_CASES) >= 60


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec_loader_names_the_key(path):
    with pytest.raises(ConfigError) as exc:
        load_spec(path)
    msg = str(exc.value)
    assert "\n" not in msg and msg == msg.strip()
    assert _names(msg, _expect(path)), msg


@pytest.mark.parametrize("path", BAD, ids=[p.stem for p in BAD])
def test_bad_spec_cli_exit_2(path, tmp_path, capsys):
    out = tmp_path / "out"
    msg = _run_cli([path, "--output", out], capsys, out)
    assert _names(msg, _expect(path)), msg


def test_every_shipped_spec_still_loads():
    for path in sorted((ROOT / "search_spaces").glob("*.yaml")):
        assert isinstance(load_spec(path), SweepSpec), path


# --- bad command lines -----------------------------------------------------------------------------


def _write(tmp_path: Path, name: str, content) -> Path:
    p = tmp_path / name
    if isinstance(content, bytes):
        p.write_bytes(content)
    else:
        p.write_text(content if isinstance(content, str) else json.dumps(content))
    return p


def _data_spec(tmp_path: Path, **kw) -> Path:
    spec = {"name": "later", "methods": ["zeroshot"], "datasets": ["eurosat"], "shots": [1], "seeds": [1]}
    spec.update(kw)
    return _write(tmp_path, "later.yaml", spec)


#: (id, argv builder (tmp_path -> argv, without --output), what the one error line must contain)
CLI_CASES = [
    ("unknown_flag", lambda t: [DEMO, "--bogus"], "unrecognized arguments: --bogus"),
    ("unknown_short_flag", lambda t: [DEMO, "-x"], "unrecognized arguments: -x"),
    ("extra_positional", lambda t: [DEMO, DEMO], "unrecognized arguments"),
    ("max_concurrent_zero", lambda t: [DEMO, "--max-concurrent", "0"], "--max-concurrent: must be >= 1 (got 0)"),
    ("max_concurrent_negative", lambda t: [DEMO, "--max-concurrent", "-3"], "--max-concurrent: must be >= 1"),
    ("max_concurrent_abc", lambda t: [DEMO, "--max-concurrent", "abc"], "--max-concurrent: invalid int value: 'abc'"),
    ("max_concurrent_float", lambda t: [DEMO, "--max-concurrent", "1.5"], "--max-concurrent: invalid int value"),
    ("max_concurrent_no_value", lambda t: [DEMO, "--max-concurrent"], "--max-concurrent: expected one argument"),
    ("output_no_value", lambda t: [DEMO, "--output"], "--output: expected one argument"),
    ("output_empty", lambda t: [DEMO, "--output", ""], "--output: must not be empty"),
    ("output_is_a_file", lambda t: [DEMO, "--output", _write(t, "afile.txt", "x")], "--output: '"),
    ("output_under_a_file", lambda t: [DEMO, "--output", "/dev/null/results"], "which is not a directory"),
    ("output_under_proc", lambda t: [DEMO, "--output", "/proc/promptsweep-results"], "cannot be written"),
    (
        "address_malformed",
        lambda t: [DEMO, "--address", "not an address"],
        "--address: 'not an address' is not a Ray address",
    ),
    (
        "dashboard_port_out_of_range",
        lambda t: [DEMO, "--dashboard", "99999"],
        "--dashboard: '99999' is not [HOST:]PORT",
    ),
    (
        "dashboard_with_a_cluster",
        lambda t: [DEMO, "--dashboard", "--address", "127.0.0.2:6379"],
        "--dashboard: only for the local Ray",
    ),
    ("address_port_out_of_range", lambda t: [DEMO, "--address", "127.0.0.2:99999"], "is not a Ray address"),
    ("address_nothing_listens", lambda t: [DEMO, "--address", f"127.0.0.2:{_free_port()}"], "no Ray cluster answers"),
    (
        "fresh_on_a_folder_no_sweep_made",
        lambda t: [
            _write(t, "s.yaml", "name: mine\nmethods: [zeroshot]\ndatasets: [digits]\n"),
            "--fresh",
            "--output",
            _mkdir(t / "o" / "mine").parent,
        ],
        "was not made by a sweep",
    ),
    (
        "tracking_uri_file_store",
        lambda t: [DEMO, "--tracking-uri", "file:///tmp/mlruns"],
        "--tracking-uri: 'file:///tmp/mlruns'",
    ),
    ("tracking_uri_bare_path", lambda t: [DEMO, "--tracking-uri", "mlruns"], "--tracking-uri: 'mlruns'"),
    ("tracking_uri_empty", lambda t: [DEMO, "--tracking-uri", " "], "--tracking-uri: must not be empty"),
    ("address_empty", lambda t: [DEMO, "--address", ""], "--address: must not be empty"),
    ("dry_run_with_value", lambda t: [DEMO, "--dry-run=yes"], "--dry-run: ignored explicit argument 'yes'"),
    ("missing_spec_argument", lambda t: [], "the following arguments are required: spec"),
    ("only_flags", lambda t: ["--dry-run"], "the following arguments are required: spec"),
    ("spec_does_not_exist", lambda t: [t / "nope.yaml"], "nope.yaml' does not exist"),
    ("spec_is_a_directory", lambda t: [t], "is a directory"),
    (
        "spec_is_a_list",
        lambda t: [_write(t, "list.yaml", "- name: x\n- methods: [coop]\n")],
        "spec: the top level must be a mapping",
    ),
    ("spec_is_a_scalar", lambda t: [_write(t, "scalar.yaml", "42\n")], "spec: the top level must be a mapping"),
    ("spec_is_empty", lambda t: [_write(t, "empty.yaml", "")], "spec: the file"),
    ("spec_not_utf8", lambda t: [_write(t, "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))], "is not UTF-8"),
    ("spec_binary", lambda t: [_write(t, "blob.yaml", bytes(range(256)))], "is not UTF-8"),
    ("spec_tab_indent", lambda t: [_write(t, "tabs.yaml", "name: x\nsearch:\n\tcoop: {}\n")], "invalid YAML at line 3"),
    (
        "spec_recursive_alias",
        lambda t: [_write(t, "alias.yaml", "name: x\nmethods: [coop]\ndatasets: [digits]\nshots: &a [*a]\n")],
        "shots[0]: must be an integer",
    ),
    # detected later, by the data preflight: still exit 2 and no output directory
    ("data_root_missing", lambda t: [_data_spec(t, data_root=str(t / "no_such_root"))], "no_such_root does not exist"),
    ("dataset_folder_missing", lambda t: [_data_spec(t, data_root=str(t))], "dataset 'eurosat' not found: folder"),
    (
        "target_folder_missing",
        lambda t: [
            _data_spec(
                t,
                datasets=["digits"],
                methods=["coop"],
                protocol="cross_dataset",
                targets=["imagenet_v2"],
                data_root=str(t),
            )
        ],
        "dataset 'imagenet_v2' not found",
    ),
    (
        "split_file_not_json",
        lambda t: [_data_spec(t, data_root=str(_write_eurosat_split(t, "{oops")))],
        "split_zhou_EuroSAT.json is not valid JSON",
    ),
]


def _write_eurosat_split(tmp_path: Path, text: str) -> Path:
    root = tmp_path / "data"
    (root / "eurosat" / "2750").mkdir(parents=True)
    (root / "eurosat" / "split_zhou_EuroSAT.json").write_text(text)
    return root


@pytest.mark.parametrize("build, expect", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_bad_command_line_exit_2(build, expect, tmp_path, capsys):
    argv = build(tmp_path)
    out = tmp_path / "out"
    if "--output" not in argv:
        argv += ["--output", out]
    msg = _run_cli(argv, capsys, out)
    assert expect in msg, msg


def test_no_data_root_anywhere(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROMPTSWEEP_DATA", raising=False)
    out = tmp_path / "out"
    msg = _run_cli([_data_spec(tmp_path), "--output", out], capsys, out)
    assert "no data root given" in msg and "PROMPTSWEEP_DATA" in msg


def test_existing_output_parent_is_kept_and_nothing_added(tmp_path, capsys):
    """An --output that already exists stays as it was: the sweep folder is not created on a data error."""
    out = tmp_path / "results"
    out.mkdir()
    rc = main([str(_data_spec(tmp_path, data_root=str(tmp_path / "gone"))), "--output", str(out)])
    assert rc == 2 and "gone does not exist" in capsys.readouterr().err
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    "argv, expect",
    [
        (["{tmp}/latin1.yaml"], "is not UTF-8"),
        (["{tmp}/later.yaml"], "dataset 'eurosat' not found"),
    ],
)
def test_subprocess_no_traceback(tmp_path, argv, expect):
    """End to end in a fresh interpreter: one line on stderr, exit 2, no traceback, no output dir."""
    _write(tmp_path, "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    _data_spec(tmp_path, data_root=str(tmp_path))
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    cmd = [
        sys.executable,
        "-m",
        "orchestrator.sweep",
        *[a.format(tmp=tmp_path) for a in argv],
        "--output",
        str(tmp_path / "out"),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expect in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


# --- property-based fuzz of the loader ---------------------------------------------------------------

VALID = {
    "name": "fuzz",
    "protocol": ["fewshot", "base2novel"],
    "methods": ["zeroshot", "coop"],
    "datasets": ["digits", "shapes"],
    "shots": [1, 2],
    "seeds": [1, 2],
    "backbone": {"arch": "promptsweep-tiny", "pretrained": None},
    "device": "cpu",
    "train": {"defaults": {"epochs": 2}, "methods": {"coop": {"batch_size": 8}}, "datasets": {"shapes": {"epochs": 1}}},
    "search": {
        "coop": {
            "n_trials": 3,
            "seeds": [1],
            "metric": "val_acc",
            "sampler": {"name": "tpe", "seed": 0, "n_startup_trials": 2},
            "pruner": {"name": "median", "n_startup_trials": 1, "n_warmup_steps": 1},
            "space": {
                "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                "n_ctx": {"type": "int", "low": 2, "high": 8, "step": 2},
                "csc": {"type": "categorical", "choices": [False, True]},
                "class_token_position": {"type": "categorical", "choices": ["end", "front"], "when": {"csc": [True]}},
            },
        }
    },
    "resources": {"cpu": 1, "gpu": 0.25},
    "max_retries": 1,
    "tracking": {"uri": "sqlite:////tmp/fuzz/mlflow.db", "experiment": "fuzz"},
    "output": "results",
    "report": {"baseline": {"fewshot": "zeroshot", "base2novel": "coop"}, "unstable": {"mads": 3.5, "max_std": 5.0}},
}

KEYS = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_0123456789", min_size=1, max_size=10)
WORDS = st.sampled_from(
    [
        "coop",
        "zeroshot",
        "tgpt",
        "linear_probe",
        "digits",
        "shapes",
        "imagenet",
        "fewshot",
        "base2novel",
        "cross_dataset",
        "tpe",
        "median",
        "int",
        "float",
        "categorical",
        "end",
        "lr",
        "n_ctx",
        "csc",
        "val_acc",
        "file:///x",
        "http://h:1",
        "",
        " ",
        "a/b",
        "ViT-B-16",
    ]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.integers(-3, 20),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    WORDS,
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.one_of(KEYS, WORDS, st.integers(-2, 2), st.none()), inner, max_size=3)
    ),
    max_leaves=8,
)


def _nodes(doc, prefix=()):
    """Every (path, node) of a document, root first."""
    yield prefix, doc
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _nodes(v, prefix + (k,))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            yield from _nodes(v, prefix + (i,))


def _parent(doc, path):
    node = doc
    for p in path[:-1]:
        node = node[p]
    return node


@st.composite
def mutated_specs(draw):
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        nodes = list(_nodes(doc))
        op = draw(st.sampled_from(["delete", "insert", "replace", "replace"]))
        if op == "insert":
            path, node = draw(st.sampled_from([(p, n) for p, n in nodes if isinstance(n, (dict, list))]))
            if isinstance(node, dict):
                node[draw(st.one_of(KEYS, WORDS))] = draw(VALUES)
            else:
                node.insert(draw(st.integers(0, len(node))), draw(VALUES))
            continue
        inner = [p for p, _ in nodes if p]
        if not inner:
            break
        path = draw(st.sampled_from(inner))
        parent = _parent(doc, path)
        if op == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(VALUES)
    return doc


_TOKEN = re.compile(r'\[(\d+)\]|\[("(?:[^"\\]|\\.)*")\]|(\.?)([^.\[\]]+)')


def _tokens(path: str):
    """``a.b[0]["x y"]`` -> ``[(None, "a"), (None, "b"), (0, None), (None, "x y")]``; None if it does not parse."""
    out, pos = [], 0
    for m in _TOKEN.finditer(path):
        if m.start() != pos or (m.group(3) == "" and m.group(4) and pos):
            return None
        index, quoted, _, plain = m.groups()
        out.append((int(index), None) if index else (None, json.loads(quoted) if quoted else plain))
        pos = m.end()
    return out if out and pos == len(path) else None


def _resolves(data, path: str, msg: str) -> bool:
    """Whether ``path`` (``a.b[0].c``, ``a["odd key"]``) names a node of ``data`` (or, for a missing key, its parent)."""
    tokens = _tokens(path)
    if tokens is None:
        return False
    node = data
    for n, (index, key) in enumerate(tokens):
        last = n == len(tokens) - 1
        if index is not None and isinstance(node, list) and index < len(node):
            node = node[index]
        elif key is not None and isinstance(node, dict) and any(str(k) == key for k in node):
            node = next(v for k, v in node.items() if str(k) == key)
        else:
            return last and isinstance(node, dict) and "required key is missing" in msg
    return True


def _check_outcome(data, call):
    try:
        spec = call()
    except ConfigError as exc:
        msg = str(exc)
        assert msg and "\n" not in msg and "\r" not in msg and msg == msg.strip(), repr(msg)
        head, sep, _ = msg.partition(": ")
        assert sep, msg
        assert head in ("spec", "<root>") or _resolves(data, head, msg), (
            f"{head!r} is not a key path of the input: {msg}"
        )
        return None
    assert isinstance(spec, SweepSpec)
    return spec


FUZZ = settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)


def test_valid_fuzz_base_loads():
    assert isinstance(parse_spec(copy.deepcopy(VALID)), SweepSpec)


@pytest.mark.parametrize(
    "patch, head",
    [
        ({"methods": ["zeroshot", "co\nop"]}, "methods[1]"),
        ({"train": {"defaults": {"two\nlines": 1}}}, 'train.defaults["two\\nlines"]'),
        ({"backbone": {"arch": "ViT\r\nB"}}, "backbone.arch"),
        ({"": 1}, '[""]'),
    ],
)
def test_line_breaks_in_values_and_keys_stay_on_one_line(patch, head):
    with pytest.raises(ConfigError) as exc:
        parse_spec({**copy.deepcopy(VALID), **patch})
    msg = str(exc.value)
    assert "\n" not in msg and "\r" not in msg and msg.startswith(head + ": "), msg


@FUZZ
@given(mutated_specs())
def test_fuzz_mutated_specs(doc):
    before = copy.deepcopy(doc)
    _check_outcome(doc, lambda: parse_spec(doc))
    assert doc == before  # the loader never edits its input


@settings(max_examples=60, deadline=None)
@given(VALUES)
def test_fuzz_any_document(value):
    _check_outcome(value, lambda: parse_spec(value))


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.one_of(
        st.text(max_size=80),
        st.binary(max_size=40),
        st.builds(
            lambda text, pos, junk: text[:pos] + junk + text[pos:],
            st.just(yaml.safe_dump(VALID, sort_keys=False)),
            st.integers(0, 900),
            st.text(alphabet=":-[]{}&*!|>'\"#%@`,? \n\t", min_size=1, max_size=4),
        ),
    )
)
def test_fuzz_yaml_text(tmp_path, content):
    path = tmp_path / "fuzz.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except Exception:
        data = None  # unreadable: the error must then be about the file itself
    try:
        load_spec(path)
    except ConfigError as exc:
        msg = str(exc)
        if data is None or msg.startswith((str(path), "spec file")):
            assert "\n" not in msg and (msg.startswith((str(path), "spec file", "spec:"))), msg
            return
    _check_outcome(data, lambda: load_spec(path))


# --- values that would break later: refused where they are read ------------------------------------


@pytest.mark.parametrize("setting", ["lr=inf", "lr=nan", "weight_decay=-inf", "num_workers=100000"])
def test_trial_cli_refuses_values_that_break_later(setting, capsys):
    from orchestrator.trial import main as trial_main

    rc = trial_main(["--method", "coop", "--dataset", "digits", "--shots", "1", "--set", setting])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: "), err
    assert setting.split("=")[0] in err[0]


def test_error_line_escapes_control_characters_and_stays_one_line():
    from fewshot.errors import error_line

    line = error_line(ConfigError("methods[1]: unknown method '\x1b[31mcoop\x1b[0m'\r\nnext \x00 \x9b"))
    assert line == "error: methods[1]: unknown method '\\x1b[31mcoop\\x1b[0m' next \\x00 \\x9b"


def test_methods_info_refuses_a_huge_class_count(capsys):
    from methods.__main__ import MAX_INFO_CLASSES
    from methods.__main__ import main as methods_main

    rc = methods_main(["info", "--method", "coop", "--classes", str(10**12)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err == [f"error: --classes must be in 1..{MAX_INFO_CLASSES} (got {10**12})"]


def test_an_alias_bomb_is_refused_quickly(tmp_path):
    """Ten levels of ten aliases would expand to 10**10 seeds: refused after counting at most the bound."""
    from orchestrator.spec import MAX_SPEC_VALUES

    lines = ["name: bad", "methods: [zeroshot]", "datasets: [digits]", "l0: &l0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 10)] + ["seeds: *l9"]
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match=f"more than {MAX_SPEC_VALUES} values"):
        load_spec(p)


def test_a_set_is_refused_so_the_spec_hash_is_stable(tmp_path):
    p = tmp_path / "set.yaml"
    p.write_text("name: s\nmethods: !!set {zeroshot, coop}\ndatasets: [digits]\n")
    with pytest.raises(ConfigError, match="write a list"):
        load_spec(p)


def test_fresh_keeps_a_folder_no_sweep_made(tmp_path, capsys):
    mine = _mkdir(tmp_path / "o" / "mine")
    spec = _write(tmp_path, "s.yaml", "name: mine\nmethods: [zeroshot]\ndatasets: [digits]\n")
    assert main([str(spec), "--fresh", "--output", str(mine.parent)]) == 2
    assert "was not made by a sweep" in capsys.readouterr().err
    assert (mine / "my-notes.txt").read_text() == "a user's folder"


def test_spec_output_that_cannot_be_written_is_named_by_its_key(tmp_path, capsys):
    spec = _write(tmp_path, "s.yaml", "name: s\nmethods: [zeroshot]\ndatasets: [digits]\noutput: /dev/null/results\n")
    assert main([str(spec)]) == 2
    assert capsys.readouterr().err.startswith("error: output: '/dev/null/results' is under /dev/null")
