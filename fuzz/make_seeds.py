"""Write seed inputs for the Python fuzz targets (fuzz/corpus/<target>/).

    python3 fuzz/make_seeds.py

Each seed starts the way fuzzlib.drive() reads it (device/transport choices,
then ops): a mock-driver initialization with every offered feature, then a
run of random actions from a fixed pseudo-random generator, so the fuzzer
starts from a live device rather than from a reset one.
"""
import os
import random

HERE = os.path.dirname(os.path.abspath(__file__))
TARGETS = [f[:-3] for f in os.listdir(os.path.join(HERE, "targets"))
           if f.endswith(".py") and f != "fuzzlib.py"]
INIT = bytes([3]) + b"\xff" * 8 + bytes([2, 0])     # op 3: features all ones, queue size 256


def seed(rng, with_init=True):
    head = bytes([rng.randrange(4), rng.randrange(2), 1])   # queue size, readonly/mrg, native
    ops = b""
    for _ in range(rng.randrange(4, 24)):
        op = rng.choice([4, 4, 5, 0, 2, 6, 7, 8, 9])
        ops += bytes([op]) + bytes(rng.randrange(256) for _ in range(rng.randrange(4, 12)))
    return head + (INIT if with_init else b"") + ops


def main():
    for t in TARGETS:
        d = os.path.join(HERE, "corpus", t)
        os.makedirs(d, exist_ok=True)
        rng = random.Random(t)
        for i in range(6):
            with open(os.path.join(d, f"seed-{i}"), "wb") as f:
                f.write(seed(rng, with_init=i != 5))


if __name__ == "__main__":
    main()
