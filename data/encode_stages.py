"""The three stages of latent precompute's Ray Data pipeline (:mod:`ldmflow.data.precompute`):
:func:`decode_shard` (CPU tasks), :class:`LatentEncoder` (a pool of actors) and
:func:`write_latent_shard` (CPU tasks).

A row is one shard: ``task`` (its :class:`EncodeTask` as JSON), ``error`` ("" or why the
shard failed), and each stage's payload. Payloads are plain bytes (npy, never pickles) and
strings, the same columns in every row of a stage, error or not: a stage that fails for a
shard returns the error as that shard's row, so one shard never stops the others.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ldmflow.data import image_shards, latent_shards, shard_stream, storage
from ldmflow.data.images import decode_rgb
from ldmflow.model import autoencoders, precision, text_encoder


@dataclass(frozen=True)
class EncodeTask:
    index: int
    image_url: str
    image_sha256: str
    output_url: str
    digest: str

    @property
    def shard(self) -> str:
        return storage.basename(self.image_url)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> EncodeTask:
        return cls(**json.loads(text))


# Members carried from the image shard to the latent shard unchanged.
CARRIED = (image_shards.KEY_CAPTION, image_shards.KEY_LABEL, image_shards.KEY_META)


def _failed(row: dict[str, Any], exc: BaseException, **empty: Any) -> dict[str, Any]:
    return {"task": row["task"], "error": f"{type(exc).__name__}: {exc}", **empty}


def decode_shard(row: dict[str, Any]) -> dict[str, Any]:
    """Stage 1: the shard's images as one uint8 (N, H, W, 3) npy, its other members as JSON."""
    task = EncodeTask.from_json(row["task"])
    try:
        data = storage.read_bytes(task.image_url)
        if hashlib.sha256(data).hexdigest() != task.image_sha256:
            raise ValueError(f"{task.image_url}: corrupt image shard (sha256 differs from its manifest)")

        def fail(exc: Exception) -> bool:
            raise ValueError(f"{task.image_url}: corrupt image shard: {exc}") from exc

        raws = list(shard_stream.samples_from_streams([{"url": task.image_url, "stream": io.BytesIO(data)}], fail))
        pixels = []
        for raw in raws:
            try:
                pixels.append(decode_rgb(raw[image_shards.image_member(raw)]))
            except Exception as exc:
                raise ValueError(f"{task.image_url}: sample {raw['__key__']!r}: undecodable image: {exc}") from exc
        # Latin-1 maps every byte to one character: the members travel as JSON, byte-exact.
        members = [{"__key__": raw["__key__"]} | {k: raw[k].decode("latin-1") for k in CARRIED if k in raw}
                   for raw in raws]
        return {"task": row["task"], "error": "", "members": json.dumps(members),
                "pixels": latent_shards.encode_array(np.stack(pixels) if pixels else np.zeros((0, 1, 1, 3), np.uint8))}
    except Exception as exc:
        return _failed(row, exc, members="[]", pixels=b"")


class LatentEncoder:
    """Stage 2, a callable class run by a pool of Ray actors: the autoencoder loaded once
    per actor, one decoded shard → its posterior moments and caption embeddings per call."""

    def __init__(self, files: Any, batch_size: int, moments: str, use_gpu: bool = False, threads: int = 1,
                 caption_embeddings: bool = False, mixed_precision: precision.MixedPrecision = "no") -> None:
        import torch

        if not isinstance(files, dict):  # an ObjectRef: the model files, put once by the driver
            import ray

            files = ray.get(files)
        self.torch = torch
        torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
        self.device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.vae, self.info = autoencoders.load_files(files, self.device)
        self.batch_size = batch_size
        self.moments = moments
        self.caption_embeddings = caption_embeddings
        self.mixed_precision = mixed_precision
        self.text_encoder = None  # loaded at the first caption

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        empty = {"members": row["members"], "mean": b"", "logvar": b"", "text": b""}
        if row["error"]:
            return {"task": row["task"], "error": row["error"], **empty}
        try:
            pixels = latent_shards.decode_array(row["pixels"])
            members = json.loads(row["members"])
            means, logvars = [], []
            for start in range(0, len(pixels), self.batch_size):
                mean, logvar = self.encode(image_shards.pixels_to_model(pixels[start : start + self.batch_size]))
                means.append(mean)
                logvars.append(logvar)
            captions = [m.get(image_shards.KEY_CAPTION, "").encode("latin-1").decode("utf-8") for m in members]
            return {"task": row["task"], "error": "", "members": row["members"],
                    "mean": latent_shards.encode_array(np.concatenate(means)),
                    "logvar": latent_shards.encode_array(np.concatenate(logvars)) if self.moments == "mean_logvar" else b"",
                    "text": latent_shards.encode_array(self.embed_captions(captions))}
        except Exception as exc:
            return _failed(row, exc, **empty)

    def embed_captions(self, captions: list[str]) -> np.ndarray:
        """(N, TEXT_DIM) float32: each caption's embedding, zeros where a sample has none (and
        (N, 0) without ``caption_embeddings``)."""
        out = np.zeros((len(captions), text_encoder.TEXT_DIM if self.caption_embeddings else 0), np.float32)
        captioned = [i for i, caption in enumerate(captions) if caption]
        if self.caption_embeddings and captioned:
            if self.text_encoder is None:
                self.text_encoder = text_encoder.SentenceEncoder(self.device)
            out[captioned] = self.text_encoder([captions[i] for i in captioned])[:, 0].numpy().astype(np.float32)
        return out

    def encode(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(B, 3, H, W) in [-1, 1] → posterior mean and log-variance, (B, C, h, w) float32
        (the encoder run in bf16 under ``mixed_precision``)."""
        with self.torch.no_grad(), precision.autocast(self.mixed_precision, self.device):
            x = self.torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
            posterior = self.vae.encode(x).latent_dist
            return posterior.mean.float().cpu().numpy(), posterior.logvar.float().cpu().numpy()


def write_latent_shard(row: dict[str, Any]) -> dict[str, Any]:
    """Stage 3: the latent shard, atomically, then its part record; the shard's info as JSON."""
    if row["error"]:
        return {"task": row["task"], "error": row["error"], "info": ""}
    task = EncodeTask.from_json(row["task"])
    try:
        means = latent_shards.decode_array(row["mean"])
        logvars = latent_shards.decode_array(row["logvar"]) if row["logvar"] else None
        texts = latent_shards.decode_array(row["text"])
        out = []
        for i, carried in enumerate(json.loads(row["members"])):
            members = {"__key__": carried.pop("__key__")}
            members |= latent_shards.latent_sample(means[i], None if logvars is None else logvars[i])
            if texts.shape[1] and carried.get(image_shards.KEY_CAPTION):
                members[latent_shards.KEY_TEXT] = latent_shards.encode_array(texts[i])
            members |= {key: value.encode("latin-1") for key, value in carried.items()}
            out.append(members)
        written = image_shards.write_shard(task.output_url, out)
        info = latent_shards.LatentShardInfo(task.shard, written.num_samples, written.bytes, written.sha256,
                                             task.shard, task.image_sha256)
        part = {"digest": task.digest, "shard": asdict(info)}
        storage.write_text(image_shards.part_record_url(storage.dirname(task.output_url), task.shard, task.digest),
                           json.dumps(part, sort_keys=True) + "\n")
        return {"task": row["task"], "error": "", "info": json.dumps(asdict(info))}
    except Exception as exc:
        return _failed(row, exc, info="")
