"""Runnable examples for the heads on the synthetic data set (see ``heads_demo``)."""
