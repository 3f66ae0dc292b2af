"""Meta-training of the hypernetwork: synthetic data, the training loop, and evaluation."""
