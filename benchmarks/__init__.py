"""Side-by-side benchmarks of lightning-dropout's layers against torch-native equivalents."""
