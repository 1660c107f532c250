"""Joint training of the five stages: examples built as served requests, the training
model, the shared epoch loop, and fine-tuning of one stage (`dynemb train --only`)."""
