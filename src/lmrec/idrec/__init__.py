"""ID-based sequential baselines (SASRec, GRU4Rec) on the shared data, evaluator and loop."""

# the architectures and their names in reports; here, not in train.py, so that the command checks a
# misspelt one before it imports torch
NAMES = {"sasrec": "SASRec", "gru4rec": "GRU4Rec", "hybrid": "hybrid (SASRec + text)"}
SHORT_NAMES = {arch: name.split(" (")[0] for arch, name in NAMES.items()}  # in a fusion's row: "hybrid"
