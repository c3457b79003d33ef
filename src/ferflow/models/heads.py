"""Classifier heads of the fine-tuned 3-class models.

`MappedHead` keeps the pretrained expression head: it computes each target class's logit as
the log-sum-exp of the logits of the source classes that map to it (the zero-shot mapping),
so softmax over its 3 outputs equals the zero-shot probabilities exactly. Fine-tuning then
starts from the pretrained model's predictions instead of a random head, and it can still
learn anything a plain 3-class layer can (each group keeps its own sub-class rows).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

MEMBER_KEY = "member"  # the buffer that marks a state_dict's head as a MappedHead


class MappedHead(nn.Module):
    def __init__(self, in_features: int, targets: list[int], num_classes: int):
        super().__init__()
        self.fc = nn.Linear(in_features, len(targets))
        member = torch.full((num_classes, len(targets)), float("-inf"))
        for row, target in enumerate(targets):
            member[target, row] = 0.0
        if torch.isinf(member).all(dim=1).any():
            raise ValueError(f"every one of the {num_classes} classes needs a source row (targets {targets})")
        # Persistent: a saved state_dict describes its own grouping (see `from_state_dict`).
        self.register_buffer(MEMBER_KEY, member)
        self.in_features, self.out_features = in_features, num_classes

    @classmethod
    def from_linear(cls, old: nn.Linear, mapping: dict[int, int | None], num_classes: int) -> "MappedHead":
        """Rows of `old` whose source class maps to a target (`labels.source_mapping`)."""
        rows = [i for i in sorted(mapping) if mapping[i] is not None]
        head = cls(old.in_features, [mapping[i] for i in rows], num_classes)
        index = torch.tensor(rows, device=old.weight.device)
        with torch.no_grad():
            head.fc.weight.copy_(old.weight.index_select(0, index))
            head.fc.bias.copy_(old.bias.index_select(0, index) if old.bias is not None else torch.zeros(len(rows)))
        return head.to(device=old.weight.device, dtype=old.weight.dtype)

    @classmethod
    def from_state_dict(cls, sd: dict[str, Tensor], prefix: str) -> "MappedHead":
        member = sd[f"{prefix}{MEMBER_KEY}"]
        num_classes, rows = member.shape
        targets = [int(member[:, r].argmax()) for r in range(rows)]
        return cls(int(sd[f"{prefix}fc.weight"].shape[1]), targets, int(num_classes))

    def forward(self, x: Tensor) -> Tensor:
        # float32: log-sum-exp under bf16/fp16 autocast would lose the small differences.
        z = self.fc(x).float()
        return torch.logsumexp(z.unsqueeze(1) + self.member, dim=2)
