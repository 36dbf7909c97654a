"""Chat formatting: templates (where Hugging Face keeps them), the renderer that masks targets, tools and the tool loop."""
