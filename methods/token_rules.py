"""How a backbone's tokenizer lays out a sequence: special tokens before the text, and where the text ends.

Prompt methods replace placeholder words by learned vectors and must know where the words sit and where
the sequence's end-of-text token is. That depends on the tokenizer, not on the ids' values:

* CLIP BPE (open_clip's ``SimpleTokenizer``): ``[SOT] words [EOT] 0 ...``; one special token before the
  text; EOT (49407) is the largest id of the vocabulary, so its position is the ``argmax`` of the ids —
  exactly how open_clip's causal text tower pools;
* SigLIP / SigLIP 2 sentencepiece tokenizers (T5 / Gemma through Hugging Face): ``words [EOS] pad ...``
  with no BOS (checked on a probe text), EOS = the tokenizer's ``eos_token_id`` (1), found as its first
  occurrence — the T5 vocabulary pads with the same id, and any word may have a larger id, so ``argmax``
  would be wrong. (The SigLIP text tower itself pools at the last position, ``methods.towers``.)

``TokenRule.of(tokenizer)`` reads the rule off the tokenizer object; any other tokenizer is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewshot.errors import ConfigError


@dataclass(frozen=True)
class TokenRule:
    """``prefix`` special tokens before the text; the end-of-text token ``eot_id``, found by ``argmax`` of the
    ids (CLIP BPE) or as its first occurrence (sentencepiece)."""

    prefix: int
    eot_id: int
    by_argmax: bool

    @classmethod
    def of(cls, tokenizer) -> "TokenRule":
        if hasattr(tokenizer, "sot_token_id") and hasattr(tokenizer, "eot_token_id"):  # CLIP BPE
            return cls(prefix=1, eot_id=int(tokenizer.eot_token_id), by_argmax=True)
        inner = getattr(tokenizer, "tokenizer", None)
        eos = getattr(inner, "eos_token_id", None)
        if eos is None:
            raise ConfigError(
                f"tokenizer {type(tokenizer).__name__} is not supported by the prompt path (CLIP BPE "
                "or SigLIP sentencepiece tokenizers only): use a backbone of a supported family"
            )
        bos = getattr(inner, "bos_token_id", None)
        first = int(tokenizer(["x"])[0, 0])
        return cls(prefix=1 if bos is not None and first == int(bos) else 0, eot_id=int(eos), by_argmax=False)

    def eot_positions(self, ids: torch.Tensor) -> torch.Tensor:
        """Position of the end-of-text token in each row of ``ids`` [N, L]."""
        if self.by_argmax:
            return ids.argmax(dim=-1)
        hit = ids == self.eot_id
        if not bool(hit.any(dim=-1).all()):
            raise ConfigError(
                f"a tokenised text has no end-of-text token (id {self.eot_id}): it was cut at the context "
                "length (use shorter class names or prompts), or the tokenizer appends none (use a "
                "tokenizer that ends each text with its EOS, as open_clip's SigLIP tokenizers do)"
            )
        return hit.int().argmax(dim=-1)

    def n_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Number of text tokens (between the prefix and the end-of-text token) per row."""
        return self.eot_positions(ids) - self.prefix
