"""Text from a trained run: `python -m examples.charlm.generate WORK_DIR RUN "prompt" [NUM_CHARS]`.

The model is rebuilt from the shapes the run recorded and the vocabulary from the run folder: no data is read.
"""
from __future__ import annotations

import sys

import torch

from examples.charlm.data import load_vocabulary
from stride import Trainer


def generate(trainer: Trainer, prompt: str, num_chars: int = 200, temperature: float = 0.0, seed: int = 0) -> str:
    """`prompt` continued by `num_chars` characters: greedy at temperature 0, else sampled."""
    vocab = load_vocabulary(trainer.run_dir.path)
    context = trainer.raw_model.context
    ids = vocab.encode(prompt)[None, :] if prompt else torch.zeros(1, 1, dtype=torch.long)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(num_chars):
        logits = trainer.predict(ids[:, -context:])[0, -1].float().cpu()
        if temperature > 0:
            next_id = torch.multinomial(torch.softmax(logits / temperature, dim=0), 1, generator=generator)
        else:
            next_id = logits.argmax().reshape(1)
        ids = torch.cat([ids, next_id.reshape(1, 1)], dim=1)
    return vocab.decode(ids[0].tolist())


def main(argv: list[str]) -> None:
    work_dir, run, prompt, *rest = argv
    trainer = Trainer(work_dir=work_dir).load_run(run)
    print(generate(trainer, prompt, int(rest[0]) if rest else 200))


if __name__ == "__main__":
    main(sys.argv[1:])
