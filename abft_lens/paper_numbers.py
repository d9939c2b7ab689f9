"""Numbers quoted from the paper (method.md section 8), for the figures that draw them beside ours: quoted,
never measured here. A module of its own so that every figure module can import it."""

from __future__ import annotations

# Table 1 (accuracy %, k = 4, n_d = 512 training prompts), GPT2-XL rows.
PAPER_GPT2_XL = {
    "vanilla": {"sst2": 67.87, "mr": 69.53, "fp": 51.07, "sst5": 30.66, "trec": 35.25, "subj": 50.98,
                "tee": 42.68, "teh": 53.03},
    "calibration": {"sst2": 68.16, "mr": 75.00, "fp": 36.43, "sst5": 28.52, "trec": 35.55, "subj": 50.10,
                    "tee": 39.26, "teh": 51.56},
    "abft": {"sst2": 87.92, "mr": 86.52, "fp": 87.67, "sst5": 37.55, "trec": 51.83, "subj": 75.07,
             "tee": 60.01, "teh": 55.35},
}
PAPER_N_TRAIN = 512  # the training prompts (n_d) behind Table 1
PAPER_DATASET_ORDER = ("sst2", "mr", "fp", "sst5", "trec", "subj", "tee", "teh")
