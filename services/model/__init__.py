"""The model: the project-made tiny model and tokenizer, loaders, CPU precision and the Ray Train warm start."""
