"""Branch an expert from the shared seed model, resizing its MLP when the plan asks for another width.

Every tensor except the MLP's is copied. For each decoder layer:
- narrower: keep the hidden units with the largest ||gate_j|| * ||up_j|| * ||down_:,j||, in their
  original order, so the units that carry most of the seed's MLP output survive;
- wider: keep all units and add new ones whose gate/up rows are freshly initialised and whose
  down_proj columns are zero, so the branched model computes exactly the seed's function at step 0
  and the new units start learning from the first gradient.
"""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from experts.checkpoint import new_model
from experts.sizing import with_mlp_width


@torch.no_grad()
def branch(seed_model: LlamaForCausalLM, width: int, seed: int) -> LlamaForCausalLM:
    if seed_model.config.mlp_bias and width != seed_model.config.intermediate_size:
        raise ValueError("resizing an MLP with biases is not supported; use a seed model with mlp_bias=False")
    child = new_model(with_mlp_width(seed_model.config, width), seed)
    parent_state = seed_model.state_dict()
    for name, tensor in child.state_dict().items():
        if ".mlp." not in name:
            tensor.copy_(parent_state[name])
    for p_layer, c_layer in zip(seed_model.model.layers, child.model.layers):
        _resize_mlp(p_layer.mlp, c_layer.mlp, width)
    return child


def _resize_mlp(parent, child, width: int) -> None:
    gate, up, down = parent.gate_proj.weight, parent.up_proj.weight, parent.down_proj.weight
    old = gate.shape[0]
    if width <= old:
        score = gate.norm(dim=1) * up.norm(dim=1) * down.norm(dim=0)
        keep = score.topk(width).indices.sort().values
        child.gate_proj.weight.copy_(gate[keep])
        child.up_proj.weight.copy_(up[keep])
        child.down_proj.weight.copy_(down[:, keep])
    else:
        child.gate_proj.weight[:old].copy_(gate)
        child.up_proj.weight[:old].copy_(up)
        child.down_proj.weight[:, :old].copy_(down)
        child.down_proj.weight[:, old:].zero_()
