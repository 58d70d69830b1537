"""Readers of foreign run formats, one module per library: Hugging Face Trainer, Lightning,
TensorBoard, nanoGPT, and plain text / JSONL / CSV logs (llm.c among them).
"""
