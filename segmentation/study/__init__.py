"""The long-skip ablation study: plan, run, score and report variants × seeds × folds."""
