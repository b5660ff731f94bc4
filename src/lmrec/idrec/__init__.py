"""ID-based sequential baselines (SASRec, GRU4Rec) on the shared data, evaluator and loop."""
