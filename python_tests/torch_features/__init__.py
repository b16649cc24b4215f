"""SAM with torch's own training machinery: AMP (GradScaler, autocast), gradient accumulation and clipping,
capturable steps and CUDA graphs, torch.compile, DDP and FSDP2. Third-party frameworks (Hugging Face,
Lightning, torchvision, ...) are tested in ``integrations/``."""
