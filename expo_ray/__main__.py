"""`python -m expo_ray`: the same as the `expo-ray` command."""
from .cli import main

main(prog_name="expo-ray")
