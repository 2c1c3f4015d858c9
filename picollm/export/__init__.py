"""Exports to Hugging Face `transformers`, and reading its GPT-2 directories (docs/export.md).

- `hf`: `picollm export` (the directory writer); `card`: its model card (README.md, from card.md);
- `gpt2`: picollm's Transformer <-> GPT2LMHeadModel, configs and weights;
- `tokenizer_files`: transformers' tokenizer files, written and read;
- `layout`: how `picollm.load` reads an exported or GPT-2 directory (JSON and safetensors only);
- `verify`: `picollm export --verify` (loads the export with transformers);
- `hf_template/`: the model code copied into every custom export (real files, read by users).

Nothing is imported here, so `picollm.checkpoint` can use `layout` without loading the writer.
"""
