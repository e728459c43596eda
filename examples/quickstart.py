"""Wrap a toy training loop with MemoryBankSpatialLoss.

Run: python examples/quickstart.py
"""

import torch

from annloss import MemoryBankSpatialLoss

torch.manual_seed(0)

# A stand-in for a GeoLM-style model: a geo embedding and a text embedding per place.
geo_encoder = torch.nn.Linear(16, 32)
text_encoder = torch.nn.Linear(16, 32)
optimizer = torch.optim.AdamW(
    list(geo_encoder.parameters()) + list(text_encoder.parameters()), lr=1e-3
)

criterion = MemoryBankSpatialLoss(
    embedding_dim=64,  # width of the concatenated [geo, nl] embedding
    distance_threshold=100.0,  # km: places closer than this are positives
    negative_threshold=200.0,  # km: places at least this far apart are negatives
    memory_size=4096,
    num_negatives=32,
)

for step in range(20):
    features = torch.randn(128, 16)
    # Pivot coordinates per row, [lon, lat] degrees (GeoJSON order), here around Europe.
    lonlat = torch.stack([torch.rand(128) * 30 - 5, torch.rand(128) * 20 + 40], dim=1).double()
    place_ids = torch.randint(0, 10_000, (128,))

    embeddings = torch.cat([geo_encoder(features), text_encoder(features)], dim=1)
    loss = criterion(embeddings, lonlat, place_ids)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

stats = criterion.stats
print(
    f"loss {loss.item():.3f}, bank {stats['bank_size']} entries, "
    f"{stats['num_bank_positive_pairs']} bank positives, "
    f"{stats['num_bank_negative_pairs']} mined negatives, "
    f"mining {1000 * stats['mining_time_s']:.1f} ms"
)
# The bank is part of the module state: save it with the model to resume exactly.
checkpoint = {"criterion": criterion.state_dict()}
