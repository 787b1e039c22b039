"""Prompts as A1111 writes them: emphasis, BREAK, <lora:...> tags, textual-inversion words, 75-token chunks."""
