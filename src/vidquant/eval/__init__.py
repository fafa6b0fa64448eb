"""Evaluation: generation under a matched protocol, weight-free video metrics, memory and time probes."""
