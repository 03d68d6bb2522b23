"""Fault injection rules for disks and NICs, parsed from a compact SPEC.

    --drive file=disk.img,faults='read-error@100-199;write-error=1%;delay=2ms..20ms;seed=42'
    --net tap=tap0,faults='rx.drop=30%;tx.dup=1%;corrupt=0.5%;delay=10ms:20%;seed=7'

SPEC is RULE;RULE;...  (no commas: they separate --drive/--net options).
A RULE is NAME[@SECTORS][=ARG[:ARG...]] (or NAME[@SECTORS]:ARG:...) where

  SECTORS  S (one sector), S-E (inclusive), or S- (to the end of the disk)
  ARG      a probability: 30%, 0.3 (default 100%)
           a delay: 5ms, 200us, 1s, or a uniform range 2ms..20ms
           times=N: fire at most N times (then the rule is spent)

Disk rules (a request matches when its sectors overlap SECTORS, or always
without @):
  read-error, write-error, io-error (both)  the request fails with IOERR
  flush-error                               FLUSH fails with IOERR
  enospc                                    writes (and write-zeroes) fail
                                            as a full disk would (IOERR,
                                            virtio-blk has no ENOSPC status;
                                            the trace says enospc)
  delay=D[:P]                               the request completes D later
Net rules, each optionally prefixed rx. or tx. (default: both directions):
  drop=P  dup=P  corrupt=P (one byte of the frame flipped)  delay=D[:P]
  link=down|up                              the link state the guest sees
Both: seed=N (the default seed is 0: runs are reproducible unless you
change it).

A failed write never reaches the image: the request is answered before
any I/O.  Errors name the bad part: `faults: 'read-eror': unknown rule`.
"""
import random
import re
import threading

DISK_KINDS = ("read-error", "write-error", "io-error", "flush-error", "enospc", "delay")
NET_KINDS = ("drop", "dup", "corrupt", "delay")
T_IN, T_OUT, T_FLUSH, T_WRITE_ZEROES = 0, 1, 4, 13
S_IOERR = 1


class FaultSpecError(ValueError):
    """A malformed SPEC; the message names the offending part."""


_DUR = re.compile(r"(\d+(?:\.\d+)?)(us|ms|s)$")
_UNIT = {"us": 1e-6, "ms": 1e-3, "s": 1.0}


def _duration(text, rule):
    m = _DUR.fullmatch(text)
    if not m:
        raise FaultSpecError(f"faults: {rule!r}: bad duration {text!r} (e.g. 5ms, 200us, 1s)")
    return float(m.group(1)) * _UNIT[m.group(2)]


def _probability(text, rule):
    try:
        p = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise FaultSpecError(f"faults: {rule!r}: bad argument {text!r}") from None
    if not 0 <= p <= 1:
        raise FaultSpecError(f"faults: {rule!r}: probability {text!r} not in 0..100%")
    return p


class Rule:
    __slots__ = ("text", "kind", "direction", "first", "last", "p", "delay", "times", "hits")

    def __init__(self, text, kind, direction=None):
        self.text, self.kind, self.direction = text, kind, direction
        self.first, self.last = 0, None          # sector range (disk), inclusive
        self.p = 1.0
        self.delay = None                        # (low, high) seconds
        self.times = None
        self.hits = 0

    def overlaps(self, sector, nsectors):
        end = sector + max(nsectors, 1) - 1
        return end >= self.first and (self.last is None or sector <= self.last)

    def fires(self, rng):
        if self.times is not None and self.hits >= self.times:
            return False
        if self.p < 1.0 and rng.random() >= self.p:
            return False
        self.hits += 1
        return True

    def pick_delay(self, rng):
        lo, hi = self.delay
        return lo if lo == hi else rng.uniform(lo, hi)


def _split_rules(spec):
    spec = spec.strip()
    if not spec:
        return []
    parts = [p.strip() for p in spec.split(";")]
    for p in parts:
        if not p:
            raise FaultSpecError(f"faults: empty rule in {spec!r}")
        if "," in p:
            raise FaultSpecError(f"faults: {p!r}: commas are not allowed (separate rules with ;)")
    return parts


def _parse_args(rule, args, want_delay):
    for a in args:
        if a.startswith("times="):
            try:
                rule.times = int(a[6:])
            except ValueError:
                raise FaultSpecError(f"faults: {rule.text!r}: bad count {a!r}") from None
            if rule.times < 0:
                raise FaultSpecError(f"faults: {rule.text!r}: bad count {a!r}")
        elif _DUR.fullmatch(a.split("..")[0]) and want_delay:
            lo, _, hi = a.partition("..")
            lo = _duration(lo, rule.text)
            hi = _duration(hi, rule.text) if hi else lo
            if hi < lo:
                raise FaultSpecError(f"faults: {rule.text!r}: delay range {a!r} is backwards")
            rule.delay = (lo, hi)
        else:
            rule.p = _probability(a, rule.text)
    if want_delay and rule.delay is None:
        raise FaultSpecError(f"faults: {rule.text!r}: delay needs a duration (e.g. delay=5ms)")


def _parse_range(rule, text):
    m = re.fullmatch(r"(\d+)(?:(-)(\d*))?", text)
    if not m:
        raise FaultSpecError(f"faults: {rule.text!r}: bad sector range {text!r} "
                             f"(S, S-E or S-)")
    rule.first = int(m.group(1))
    if m.group(2) is None:
        rule.last = rule.first
    else:
        rule.last = int(m.group(3)) if m.group(3) else None
    if rule.last is not None and rule.last < rule.first:
        raise FaultSpecError(f"faults: {rule.text!r}: sector range {text!r} is backwards")


def _parse_seed(text, value):
    try:
        return int(value)
    except ValueError:
        raise FaultSpecError(f"faults: {text!r}: seed must be an integer") from None


def _split_rule(text):
    """NAME[@RANGE] and its ARGs: NAME[@RANGE]=A:B or NAME[@RANGE]:A:B."""
    cut = min((i for i in (text.find("="), text.find(":")) if i >= 0), default=len(text))
    rest = text[cut + 1:]
    return text[:cut], rest.split(":") if rest else []


class DiskFaults:
    """Parsed disk rules; decide() is called once per request, in order."""

    def __init__(self, spec=""):
        self.spec = spec
        self.rules = []
        self.seed = 0
        for text in _split_rules(spec):
            head, args = _split_rule(text)
            name, at, rng_text = head.partition("@")
            if name == "seed":
                self.seed = _parse_seed(text, ":".join(args))
                continue
            if name not in DISK_KINDS:
                raise FaultSpecError(f"faults: {text!r}: unknown disk rule {name!r} "
                                     f"(known: {', '.join(DISK_KINDS)}, seed)")
            rule = Rule(text, name)
            if at:
                _parse_range(rule, rng_text)
            _parse_args(rule, args, name == "delay")
            self.rules.append(rule)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def decide(self, typ, sector, nsectors):
        """(status or None, delay seconds, reason) for one request."""
        status, delay, reason = None, 0.0, None
        with self._lock:
            for r in self.rules:
                k = r.kind
                if k == "delay":
                    if r.overlaps(sector, nsectors) and r.fires(self._rng):
                        delay += r.pick_delay(self._rng)
                    continue
                if status is not None:
                    continue
                if k == "flush-error":
                    hit = typ == T_FLUSH
                elif k == "read-error":
                    hit = typ == T_IN
                elif k == "write-error":
                    hit = typ == T_OUT
                elif k == "io-error":
                    hit = typ in (T_IN, T_OUT)
                else:                                        # enospc
                    hit = typ in (T_OUT, T_WRITE_ZEROES)
                if hit and (k == "flush-error" or r.overlaps(sector, nsectors)) \
                        and r.fires(self._rng):
                    status, reason = S_IOERR, k
        return status, delay, reason

    @property
    def noop(self):
        return not self.rules

    def counts(self):
        return {r.text: r.hits for r in self.rules}


class NetFaults:
    """Parsed NIC rules; decide() is called once per frame and direction."""

    def __init__(self, spec=""):
        self.spec = spec
        self.rules = []
        self.seed = 0
        self.link_up = True
        for text in _split_rules(spec):
            head, args = _split_rule(text)
            arg = ":".join(args)
            direction, dot, name = head.partition(".")
            if not dot:
                direction, name = None, head
            elif direction not in ("rx", "tx"):
                raise FaultSpecError(f"faults: {text!r}: direction must be rx. or tx.")
            if name == "seed" and direction is None:
                self.seed = _parse_seed(text, arg)
                continue
            if name == "link" and direction is None:
                if arg not in ("up", "down"):
                    raise FaultSpecError(f"faults: {text!r}: link=up or link=down")
                self.link_up = arg == "up"
                continue
            if name not in NET_KINDS:
                raise FaultSpecError(f"faults: {text!r}: unknown net rule {name!r} "
                                     f"(known: {', '.join(NET_KINDS)}, link, seed; "
                                     f"prefix rx. or tx.)")
            if "@" in name:
                raise FaultSpecError(f"faults: {text!r}: net rules take no sector range")
            rule = Rule(text, name, direction)
            _parse_args(rule, args, name == "delay")
            self.rules.append(rule)
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    @property
    def noop(self):
        return not self.rules and self.link_up

    def decide(self, direction, frame, hdr_len):
        """[(delay seconds, frame bytes)] to deliver for one frame: [] dropped,
        two entries duplicated.  `direction` is "rx" or "tx"; the first
        `hdr_len` bytes (virtio_net_hdr) are never corrupted."""
        out = [(0.0, frame)]
        with self._lock:
            for r in self.rules:
                if r.direction not in (None, direction) or not out:
                    continue
                if not r.fires(self._rng):
                    continue
                if r.kind == "drop":
                    out = []
                elif r.kind == "dup":
                    out = out + [out[-1]]
                elif r.kind == "corrupt":
                    d, f = out[0]
                    if len(f) > hdr_len:
                        b = bytearray(f)
                        i = self._rng.randrange(hdr_len, len(b))
                        b[i] ^= 1 << self._rng.randrange(8)
                        out[0] = (d, bytes(b))
                else:                                        # delay
                    extra = r.pick_delay(self._rng)
                    out = [(d + extra, f) for d, f in out]
        return out

    def counts(self):
        return {r.text: r.hits for r in self.rules}
