"""Generation: the batched decoding engine, offline batches, the request scheduler and streamed
text."""
