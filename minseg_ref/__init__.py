"""Test-time reference harness for minseg: builds the originals (torchvision, smp) or reads the recorded
fixtures (YOLACT, detectron2), and compares. Needs the `test` extra; `minseg/` never imports this package."""
