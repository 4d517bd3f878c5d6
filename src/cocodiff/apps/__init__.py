"""Applications built on the engine: the command line, the demo, the quality harness, the small trained model
and its training, the V similarity probe, the all-to-all benchmark, rank launching and the model families'
full-size and tiny configurations. They depend on the engine; the engine never imports them."""
