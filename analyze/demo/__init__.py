"""The built-in demo: MiniGPT, the regular/irregular verb corpus and its logged training loop."""
