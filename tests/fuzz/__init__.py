"""Coverage-guided fuzzers (atheris), run by `make fuzz`; never collected by pytest."""
