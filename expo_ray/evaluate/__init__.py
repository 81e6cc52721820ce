"""Evaluation: prompt sets -> vLLM generation -> reward scoring -> aggregation per alpha -> report."""
