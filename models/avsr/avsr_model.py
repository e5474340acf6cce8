"""The AVSR model: audio/video encoders -> projectors -> packed token sequence -> (LoRA) causal LM.

Sequence of one row (docs/avsr.md):
    BOS  <audio> a_1..a_n </audio>  <video> v_1..v_m </video>  prompt  transcript EOS  [right padding]
Delimiters are plain text (`<audio>` is tokenised by the LLM's tokenizer and embedded with its embedding
table), so any LLM works without new tokens or resized embeddings. Modality tokens come only from valid
frames; labels are the transcript ids and EOS, -100 everywhere else.
"""

from __future__ import annotations

import torch
from torch import nn

from models import segments as seg
from models.avsr.sequence import PackedSequence, Piece, pack_rows
from models.fast import eager_generation

MODALITIES = {"audio": ("audio",), "video": ("video",), "audiovisual": ("audio", "video")}
DEFAULT_DELIMITERS = {"audio": ("<audio>", "</audio>"), "video": ("<video>", "</video>")}


class AVSRModel(nn.Module):
    """Args:
    llm: causal LM (usually PEFT-wrapped); tokenizer: its tokenizer (pad token set).
    modality: audio (ASR) | video (VSR) | audiovisual (AVSR).
    audio_encoder / video_encoder: modules with `output_dim` and `forward(x, lengths) -> (features, lengths)`;
        only those of the chosen modality are needed.
    audio_projector / video_projector: `ModalityProjector`s to the LLM width.
    prompt: task instruction placed after the modality tokens.
    delimiters: {modality: (open, close)} text markers around each modality's tokens.
    bos_token: first token (default: the tokenizer's BOS).
    """

    def __init__(
        self,
        llm: nn.Module,
        tokenizer,
        modality: str,
        prompt: str,
        audio_encoder: nn.Module | None = None,
        video_encoder: nn.Module | None = None,
        audio_projector: nn.Module | None = None,
        video_projector: nn.Module | None = None,
        delimiters: dict | None = None,
        bos_token: str | None = None,
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"modality must be one of {sorted(MODALITIES)}, got {modality!r}")
        self.modalities = MODALITIES[modality]
        self.modality = modality
        self.llm, self.tokenizer = llm, tokenizer
        encoders = {"audio": audio_encoder, "video": video_encoder}
        projectors = {"audio": audio_projector, "video": video_projector}
        for name in self.modalities:
            if encoders[name] is None or projectors[name] is None:
                raise ValueError(f"modality {modality!r} needs a {name} encoder and a {name} projector")
        self.encoders = nn.ModuleDict({name: encoders[name] for name in self.modalities})
        self.projectors = nn.ModuleDict({name: projectors[name] for name in self.modalities})
        bos = bos_token or tokenizer.bos_token
        if bos is None:
            raise ValueError("the tokenizer has no BOS token; set `model.bos_token` in the config")
        delimiters = {**DEFAULT_DELIMITERS, **(delimiters or {})}
        self.text_ids = {
            "bos": [tokenizer.convert_tokens_to_ids(bos)],
            "prompt": self._ids(prompt),
            **{f"{m}_open": self._ids(delimiters[m][0]) for m in self.modalities},
            **{f"{m}_close": self._ids(delimiters[m][1]) for m in self.modalities},
        }
        self.eos_id = tokenizer.eos_token_id

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def _embed(self, ids: list[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
        ids = torch.as_tensor(ids, dtype=torch.long, device=device)
        return self.llm.get_input_embeddings()(ids)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.llm.get_input_embeddings().weight.dtype

    def modality_tokens(self, batch: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{modality: (tokens [B,N,D_llm], lengths [B])} for the active modalities."""
        out = {}
        for name in self.modalities:
            if name not in batch or batch[name] is None:
                raise KeyError(f"modality {self.modality!r} needs batch[{name!r}] (and {name}_lengths)")
            encoder = self.encoders[name]
            # an encoder fed by both streams (AV-HuBERT with modality audiovisual) also gets the audio
            both = {"audio": batch.get("audio"), "audio_lengths": batch.get("audio_lengths")}
            extra = both if getattr(encoder, "reads_audio_too", False) else {}
            features, lengths = encoder(batch[name], batch[f"{name}_lengths"], **extra)
            tokens, lengths = self.projectors[name](features, lengths)
            out[name] = (tokens.to(self.dtype), lengths)
        return out

    def build_inputs(self, batch: dict, with_targets: bool = True) -> PackedSequence:
        """Packed LLM inputs: right-padded with transcript + EOS targets, or left-padded prefixes to generate."""
        device = self.device
        tokens = self.modality_tokens(batch)
        # one host read per modality, not one per clip: slicing by a device length would sync every row
        lengths = {name: per_clip.tolist() for name, (_, per_clip) in tokens.items()}
        fixed = {k: self._embed(v, device) for k, v in self.text_ids.items()}
        if with_targets:  # every transcript + EOS embedded in one call; labels stay on the host for pack_rows
            ids = [self._ids(" " + text.strip()) + [self.eos_id] for text in batch["text"]]
            sizes = [len(row) for row in ids]
            flat = torch.tensor([i for row in ids for i in row], dtype=torch.long)
            labels, target_embeds = flat.split(sizes), self._embed(flat, device).split(sizes)
        rows = []
        for b in range(len(batch["text"])):
            pieces = [Piece(fixed["bos"], seg.BOS)]
            for name in self.modalities:
                segment = seg.AUDIO if name == "audio" else seg.VIDEO
                pieces += [
                    Piece(fixed[f"{name}_open"], seg.DELIMITER),
                    Piece(tokens[name][0][b, : lengths[name][b]], segment),
                    Piece(fixed[f"{name}_close"], seg.DELIMITER),
                ]
            pieces.append(Piece(fixed["prompt"], seg.PROMPT))
            if with_targets:
                pieces.append(Piece(target_embeds[b], seg.TARGET, labels=labels[b]))
            rows.append(pieces)
        return pack_rows(rows, padding_side="right" if with_targets else "left")

    @torch.no_grad()
    def generate(self, batch: dict, max_new_tokens: int = 64, num_beams: int = 1, **kwargs) -> list[str]:
        """Greedy (num_beams=1) or beam-search transcripts for a batch (left-padded prefixes, batched)."""
        packed = self.build_inputs(batch, with_targets=False)
        with eager_generation():  # compiled layers (kernels=fast) would recompile per decoding step
            output = self.llm.generate(
                **packed.llm_inputs(),
                max_new_tokens=max_new_tokens,
                num_beams=num_beams,
                do_sample=False,
                eos_token_id=self.eos_id,
                pad_token_id=self.tokenizer.pad_token_id,
                **kwargs,
            )  # with inputs_embeds only, decoder-only models return just the new tokens
        return [
            text.strip()
            for text in self.tokenizer.batch_decode(
                output, skip_special_tokens=True, clean_up_tokenization_spaces=False
            )
        ]
