"""A GeoLM-style joint pretraining step with MemoryBankSpatialLoss added.

A compact, runnable mirror of GeoLM's joint pretraining step, with random weights and no
downloads:

- A SpatialBERT-style encoder: transformers' ``BertForMaskedLM`` with a small config. Each
  token's embedding gets parameter-free sinusoidal embeddings of its EPSG:4087 offset to the
  pivot place, in hundreds of metres (GeoLM's ``distance_norm_factor`` of 100).
- Inputs from GeoNames: a geo pseudo-sentence per place (``[CLS] pivot [SEP] neighbour [SEP]
  ...``, nearest first) and a text sentence naming the same place.
- Three losses summed into one backward pass and one optimiser step. The first is masked-language
  modelling on the pseudo-sentence (GeoLM masks the text followed by the pseudo-sentence; the
  pseudo-sentence alone keeps this example short). The second is pytorch-metric-learning's ``NTXentLoss``
  between the geo and text entity embeddings (mean of the last layer over the entity's tokens).
  The third is ``MemoryBankSpatialLoss`` on the concatenated ``[geo, text]`` embedding with the
  pivot's ``[lng, lat]`` degrees.
- fp16 autocast and a gradient scaler on CUDA; the bank saved in the checkpoint with the model,
  the optimiser and the scaler, and resumed from it.

Run: python examples/geolm_loop.py --steps 200    (pip install 'annloss[geolm]' first)
docs/geolm.md explains each change to a GeoLM training loop.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning.losses import NTXentLoss
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import BertConfig, BertForMaskedLM, PreTrainedTokenizerFast
from transformers.utils import logging as transformers_logging

from annloss import MemoryBankSpatialLoss, lonlat_to_epsg4087
from annloss.demo.data import PlaceTable, find_neighbours, format_nl_text, load_places

# Spatial offset given to [CLS], [SEP] and padding, in model units, as GeoLM's default.
SPATIAL_DIST_FILL = 90_000.0
# GeoLM divides EPSG:4087 metres by this before they enter the model.
DISTANCE_NORM_FACTOR = 100.0


def build_tokenizer(table: PlaceTable, vocabulary_size: int) -> PreTrainedTokenizerFast:
    """Build a cased WordPiece tokenizer whose vocabulary comes from the place names and texts.

    Frequent words are whole entries, and every character seen is an entry too (alone and as a
    ``##`` continuation), so no input becomes [UNK]. Pretrained GeoLM uses bert-base-cased's
    vocabulary instead. This one needs no download.
    """
    texts = list(table.names) + [format_nl_text(table, i) for i in range(len(table))]
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words: Counter[str] = Counter()
    for text in texts:
        words.update(word for word, _ in pre_tokenizer.pre_tokenize_str(text))
    characters = sorted({character for word in words for character in word})
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    pieces = characters + [f"##{character}" for character in characters]
    budget = max(vocabulary_size - len(specials) - len(pieces), 0)
    entries = dict.fromkeys(specials + pieces + [word for word, _ in words.most_common(budget)])
    vocabulary = {entry: index for index, entry in enumerate(entries)}

    backend = Tokenizer(models.WordPiece(vocabulary, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizer
    backend.decoder = decoders.WordPiece()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        special_tokens=[("[CLS]", vocabulary["[CLS]"]), ("[SEP]", vocabulary["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def sinusoidal_embedding(offsets: Tensor, width: int) -> Tensor:
    """Map ``(B, L)`` scalar offsets to ``(B, L, width)`` sines and cosines, GeoLM-style."""
    frequencies = 1.0 / 10_000 ** (
        torch.arange(width // 2, device=offsets.device, dtype=torch.float32) / (width // 2)
    )
    angles = offsets.float()[..., None] * frequencies
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


class SpatialBert(nn.Module):
    """BERT whose token embeddings carry each token's spatial offset to the pivot."""

    def __init__(self, vocabulary_size: int, hidden_size: int, num_layers: int, max_length: int):
        super().__init__()
        config = BertConfig(
            vocab_size=vocabulary_size,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=max(hidden_size // 64, 1),
            intermediate_size=4 * hidden_size,
            max_position_embeddings=max_length,
        )
        self.bert = BertForMaskedLM(config)

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        offset_x: Tensor,
        offset_y: Tensor,
        spans: Tensor,
        labels: Tensor | None = None,
    ) -> tuple[Tensor | None, Tensor]:
        """Return the MLM loss (with ``labels``) and the ``(B, H)`` mean over each entity span."""
        words = self.bert.get_input_embeddings()(input_ids)
        width = words.shape[-1]
        # GeoLM adds both axes' sinusoids, scaled by 0.01, to the word embeddings.
        spatial = sinusoidal_embedding(offset_x, width) + sinusoidal_embedding(offset_y, width)
        output = self.bert(
            inputs_embeds=words + 0.01 * spatial.to(words.dtype),
            attention_mask=attention_mask,
            labels=labels,
            output_hidden_states=True,
        )
        last = output.hidden_states[-1]
        positions = torch.arange(last.shape[1], device=last.device)
        in_span = (positions >= spans[:, :1]) & (positions < spans[:, 1:])
        entity = (last * in_span[..., None]).sum(dim=1) / in_span.sum(dim=1, keepdim=True)
        return output.loss, entity


class GeoNamesBatches:
    """Random batches of GeoNames places as GeoLM-style geo and text model inputs."""

    def __init__(self, table: PlaceTable, tokenizer, num_neighbours: int, max_length: int):
        self.table = table
        self.tokenizer = tokenizer
        self.max_length = max_length
        every_place = np.arange(len(table))
        self.neighbours, _ = find_neighbours(table.coordinates, every_place, num_neighbours)
        # EPSG:4087 in GeoLM's model units; offsets to the pivot are differences of these.
        self.projected = lonlat_to_epsg4087(
            torch.from_numpy(table.coordinates), distance_norm_factor=DISTANCE_NORM_FACTOR
        ).numpy()

    def geo_input(self, place: int) -> tuple[list[int], list[float], list[float], int]:
        """Token ids, x and y offsets and pivot length of one pseudo-sentence."""
        tokenizer = self.tokenizer
        ids, offset_x, offset_y = [tokenizer.cls_token_id], [SPATIAL_DIST_FILL], [SPATIAL_DIST_FILL]
        pivot_length = 0
        for rank, other in enumerate([place, *self.neighbours[place]]):
            name_ids = tokenizer(self.table.names[other], add_special_tokens=False)["input_ids"]
            if len(ids) + len(name_ids) + 1 > self.max_length:
                break
            dx, dy = self.projected[other] - self.projected[place]
            ids += name_ids + [tokenizer.sep_token_id]
            offset_x += [float(dx)] * len(name_ids) + [SPATIAL_DIST_FILL]
            offset_y += [float(dy)] * len(name_ids) + [SPATIAL_DIST_FILL]
            if rank == 0:
                pivot_length = len(name_ids)
        return ids, offset_x, offset_y, pivot_length

    def __call__(self, places: np.ndarray, device: torch.device) -> dict[str, Tensor]:
        """Return the model inputs, coordinates and ids of ``places``."""
        batch_size, length = len(places), self.max_length
        pad = self.tokenizer.pad_token_id
        geo_ids = torch.full((batch_size, length), pad, dtype=torch.long)
        offsets = torch.full((2, batch_size, length), SPATIAL_DIST_FILL)
        geo_spans = torch.zeros(batch_size, 2, dtype=torch.long)
        for row, place in enumerate(places):
            ids, offset_x, offset_y, pivot_length = self.geo_input(int(place))
            geo_ids[row, : len(ids)] = torch.tensor(ids)
            offsets[0, row, : len(ids)] = torch.tensor(offset_x)
            offsets[1, row, : len(ids)] = torch.tensor(offset_y)
            geo_spans[row] = torch.tensor([1, 1 + pivot_length])

        # The text names the place first, so its entity span starts after [CLS]. Text tokens
        # carry no spatial offset (GeoLM gives them 0).
        texts = [format_nl_text(self.table, int(place)) for place in places]
        text = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt"
        )
        name_lengths = [
            len(self.tokenizer(self.table.names[int(place)], add_special_tokens=False)["input_ids"])
            for place in places
        ]
        text_spans = torch.tensor([[1, 1 + min(n, length - 2)] for n in name_lengths])
        batch = {
            "geo_ids": geo_ids,
            "geo_mask": (geo_ids != pad).long(),
            "geo_x": offsets[0],
            "geo_y": offsets[1],
            "geo_spans": geo_spans,
            "text_ids": text["input_ids"],
            "text_mask": text["attention_mask"],
            "text_spans": text_spans,
            # The pivot's [lng, lat] degrees and GeoNames id, for the spatial loss.
            "pivot_lnglat": torch.from_numpy(self.table.coordinates[places]),
            "entity_id": torch.from_numpy(self.table.ids[places]),
        }
        return {name: value.to(device) for name, value in batch.items()}


def mask_tokens(ids: Tensor, tokenizer, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mask 15% of the non-special tokens; return the masked ids and the MLM labels."""
    special = (
        (ids == tokenizer.pad_token_id)
        | (ids == tokenizer.cls_token_id)
        | (ids == tokenizer.sep_token_id)
    )
    chosen = (torch.rand(ids.shape, generator=generator) < 0.15).to(ids.device) & ~special
    labels = torch.where(chosen, ids, -100)
    return torch.where(chosen, tokenizer.mask_token_id, ids), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="total steps, resumed included")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hidden-size", type=int, default=128, help="768 for bert-base")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per input")
    parser.add_argument(
        "--vocabulary-size", type=int, default=8192, help="WordPiece entries (bert-base: 28,996)"
    )
    parser.add_argument(
        "--min-population", type=int, default=15000, choices=[500, 1000, 5000, 15000]
    )
    parser.add_argument("--radius-km", type=float, default=100.0, help="positive radius")
    parser.add_argument("--spatial-weight", type=float, default=1.0)
    parser.add_argument("--checkpoint", type=Path, default=Path("geolm-checkpoint.pt"))
    parser.add_argument("--save-every", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    arguments = parser.parse_args()
    device = torch.device(arguments.device)
    transformers_logging.set_verbosity_error()

    table = load_places(arguments.min_population)
    tokenizer = build_tokenizer(table, arguments.vocabulary_size)
    batches = GeoNamesBatches(table, tokenizer, num_neighbours=8, max_length=arguments.max_length)

    torch.manual_seed(0)
    model = SpatialBert(
        len(tokenizer), arguments.hidden_size, arguments.layers, arguments.max_length
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # NOTE: the fp16 autocast path has not run on a GPU yet; the tests run this loop on the CPU.
    use_fp16 = device.type == "cuda"
    scaler = torch.amp.GradScaler(device.type, enabled=use_fp16)
    # GeoLM's geo-text contrastive loss. Row i of the geo and the text half share label i.
    geo_text_loss = NTXentLoss(temperature=0.05)
    # Built once, next to the other losses; its bank lives in the checkpoint.
    spatial_loss = MemoryBankSpatialLoss(
        embedding_dim=2 * arguments.hidden_size,  # [geo, text] concatenated
        distance_threshold=arguments.radius_km,  # km, on the pivots' [lng, lat] degrees
        negative_threshold=2 * arguments.radius_km,
        memory_size=16_384,
        num_negatives=64,
    ).to(device)

    start = 0
    if arguments.checkpoint.exists():
        state = torch.load(arguments.checkpoint, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scaler.load_state_dict(state["scaler"])
        spatial_loss.load_state_dict(state["spatial_loss"])
        start = int(state["step"])
        print(f"resumed at step {start} with {spatial_loss.bank_size} bank entries")

    progress = tqdm(
        range(start, arguments.steps), desc="GeoLM joint step", initial=start, total=arguments.steps
    )
    for step in progress:
        generator = torch.Generator().manual_seed(step)  # a resumed run gets the same batches
        places = torch.randint(len(table), (arguments.batch_size,), generator=generator).numpy()
        batch = batches(places, device)
        masked_ids, mlm_labels = mask_tokens(batch["geo_ids"], tokenizer, generator)

        with torch.autocast(device.type, dtype=torch.float16, enabled=use_fp16):
            mlm_loss, _ = model(
                masked_ids,
                batch["geo_mask"],
                batch["geo_x"],
                batch["geo_y"],
                batch["geo_spans"],
                labels=mlm_labels,
            )
            _, geo = model(
                batch["geo_ids"],
                batch["geo_mask"],
                batch["geo_x"],
                batch["geo_y"],
                batch["geo_spans"],
            )
            zeros = torch.zeros_like(batch["text_ids"], dtype=torch.float32)
            _, text = model(
                batch["text_ids"], batch["text_mask"], zeros, zeros, batch["text_spans"]
            )
            labels = torch.arange(len(places), device=device).repeat(2)
            contrastive = geo_text_loss(torch.cat([geo, text]), labels)
        # The spatial loss scores half-precision embeddings in float32 by itself.
        spatial = spatial_loss(
            torch.cat([geo, text], dim=1), batch["pivot_lnglat"], batch["entity_id"]
        )
        loss = mlm_loss + contrastive + arguments.spatial_weight * spatial

        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        scaler.step(optimizer)
        scaler.update()
        progress.set_postfix(
            mlm=f"{mlm_loss.item():.3f}",
            ntxent=f"{contrastive.item():.3f}",
            spatial=f"{spatial.item():.3f}",
            bank=spatial_loss.bank_size,
        )

        if (step + 1) % arguments.save_every == 0 or step + 1 == arguments.steps:
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict(),
                    "spatial_loss": spatial_loss.state_dict(),
                    "step": step + 1,
                },
                arguments.checkpoint,
            )
            stats = spatial_loss.stats
            progress.write(
                f"step {step + 1}: mlm {mlm_loss.item():.3f}, ntxent {contrastive.item():.3f}, "
                f"spatial {spatial.item():.3f}, bank {spatial_loss.bank_size} entries, "
                f"{stats['num_bank_positive_pairs']} bank positives, "
                f"{stats['num_bank_negative_pairs']} mined negatives"
            )


if __name__ == "__main__":
    main()
