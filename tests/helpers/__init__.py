"""What tests share: runners, test-only plugins and small generated benchmarks (imported, never conftest)."""
