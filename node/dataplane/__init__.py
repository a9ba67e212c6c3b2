"""Tensors between nodes: the StageService servicer, the hop sender and its channels, the per-round codec agreement,
and the link emulator (a test tool).
"""
