"""Layers: expert FFNs picked by route (S-MoE) and learned-gate switch FFNs, as fairseq Transformer layers."""
