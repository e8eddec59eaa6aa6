//! serde_py against the real Python codec: values go Rust -> wire -> `kameo._native.decode`
//! -> `kameo._native.encode` -> wire -> Rust and must come back the same, Python must see
//! the Python types the mapping promises, and what Python encodes (datetime, Decimal, UUID,
//! sets, numpy arrays, dataclasses, ...) must decode into `kameo_host::Value` field by field.
//!
//! The interpreter is `KAMEO_TEST_PYTHON` (set by `make test`), with kameo and numpy
//! importable; without it the tests print a notice and pass. Every interpreter process is
//! killed if it has not finished within `DEADLINE`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use kameo_host::serde_py::{Class, Date, DateTime, NdArray, Time, TimeDelta, Tz};
use kameo_host::{from_wire, to_wire, Value};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

const DEADLINE: Duration = Duration::from_secs(120);

/// Classes the fixtures and the values sent from Rust use: they must be importable where
/// the codec decodes them, so they live in a module, not in the script.
const FIXTURES: &str = r#"
import dataclasses, enum, typing

@dataclasses.dataclass
class Point:
    x: int
    y: int

class Color(enum.Enum):
    RED = "red"

class Pair(typing.NamedTuple):
    a: int
    b: str
"#;

/// Requests on stdin, answers on stdout, each a u8 op then u32-LE-length-prefixed blobs:
/// `E` blob -> encode(decode(blob)), repr(type(x));  `V` expr -> encode(eval(expr));
/// `C` expr, blob -> repr(eval(expr)) with x = decode(blob).
const SCRIPT: &str = r#"
import sys, struct, datetime, decimal, uuid, math
import numpy as np
from kameo import _native
import kameo_host_fixtures as fx

inp, out = sys.stdin.buffer, sys.stdout.buffer

def blob():
    (n,) = struct.unpack("<I", inp.read(4))
    return inp.read(n)

def send(*blobs):
    for b in blobs:
        out.write(struct.pack("<I", len(b)) + b)
    out.flush()

env = {"datetime": datetime, "decimal": decimal, "uuid": uuid, "np": np, "fx": fx, "math": math}
while True:
    op = inp.read(1)
    if not op:
        break
    if op == b"E":
        x = _native.decode(blob())
        send(_native.encode(x), repr(type(x)).encode())
    elif op == b"V":
        send(_native.encode(eval(blob().decode(), env)))
    elif op == b"C":
        expr = blob().decode()
        x = _native.decode(blob())
        send(repr(eval(expr, dict(env, x=x))).encode())
"#;

struct Python {
    stdin: Option<ChildStdin>,
    stdout: ChildStdout,
    done: Option<mpsc::Sender<()>>,
    watchdog: Option<JoinHandle<()>>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Python {
    /// The interpreter, or None (with a notice) when KAMEO_TEST_PYTHON is not set.
    fn start() -> Option<Python> {
        let Some(python) = std::env::var_os("KAMEO_TEST_PYTHON") else {
            println!("KAMEO_TEST_PYTHON is not set: skipping the tests through Python's codec");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "kameo-host-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("kameo_host_fixtures.py"), FIXTURES).unwrap();
        let mut child: Child = Command::new(&python)
            .arg("-c")
            .arg(SCRIPT)
            .env("PYTHONPATH", &dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run KAMEO_TEST_PYTHON={python:?}: {e}"));
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        // The watchdog owns the child: it kills it at the deadline, and reaps it.
        let (done, rx) = mpsc::channel::<()>();
        let watchdog = std::thread::spawn(move || {
            if let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(DEADLINE) {
                eprintln!("the Python codec process passed its deadline: killed");
                let _ = child.kill();
            }
            let _ = child.wait();
        });
        Some(Python {
            stdin,
            stdout,
            done: Some(done),
            watchdog: Some(watchdog),
            _dir: TempDir(dir),
        })
    }

    fn request(&mut self, op: u8, blobs: &[&[u8]], answers: usize) -> Vec<Vec<u8>> {
        let w = self.stdin.as_mut().expect("stdin open");
        let mut msg = vec![op];
        for b in blobs {
            msg.extend_from_slice(&(b.len() as u32).to_le_bytes());
            msg.extend_from_slice(b);
        }
        w.write_all(&msg).expect("write to python");
        w.flush().expect("flush to python");
        (0..answers)
            .map(|_| {
                let mut n = [0; 4];
                self.stdout
                    .read_exact(&mut n)
                    .expect("python answered (see its stderr above)");
                let mut b = vec![0; u32::from_le_bytes(n) as usize];
                self.stdout.read_exact(&mut b).expect("python answered");
                b
            })
            .collect()
    }

    /// Python decodes `b` and encodes what it got: those bytes, and `repr(type(x))`.
    fn echo(&mut self, b: &[u8]) -> (Vec<u8>, String) {
        let mut a = self.request(b'E', &[b], 2);
        let ty = String::from_utf8(a.pop().unwrap()).unwrap();
        (a.pop().unwrap(), ty)
    }

    /// The encoding of the Python expression `expr`.
    fn eval(&mut self, expr: &str) -> Vec<u8> {
        self.request(b'V', &[expr.as_bytes()], 1).pop().unwrap()
    }

    /// `repr(expr)` with `x` the decoded `b`.
    fn check(&mut self, expr: &str, b: &[u8]) -> String {
        String::from_utf8(self.request(b'C', &[expr.as_bytes(), b], 1).pop().unwrap()).unwrap()
    }
}

impl Drop for Python {
    fn drop(&mut self) {
        // EOF ends the script; the watchdog reaps it (or kills it at the deadline).
        self.stdin.take();
        if let Some(done) = self.done.take() {
            let _ = done.send(());
        }
        if let Some(w) = self.watchdog.take() {
            let _ = w.join();
        }
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Kind {
    Plain,
    Big(i128),
    Huge(u128, Option<String>),
    Shape { sides: Vec<u8>, flags: (bool, i16) },
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Msg {
    name: String,
    price: f64,
    wide: u64,
    kinds: Vec<Kind>,
    #[serde(with = "serde_bytes")]
    raw: Vec<u8>,
    by_key: BTreeMap<String, Option<i32>>,
    by_int: BTreeMap<i64, String>,
    pair: (u8, String),
    nested: Option<Box<Msg>>,
}

fn same(a: &Msg, b: &Msg) -> bool {
    a.price.to_bits() == b.price.to_bits()
        && a.name == b.name
        && a.wide == b.wide
        && a.kinds == b.kinds
        && a.raw == b.raw
        && a.by_key == b.by_key
        && a.by_int == b.by_int
        && a.pair == b.pair
        && match (&a.nested, &b.nested) {
            (None, None) => true,
            (Some(a), Some(b)) => same(a, b),
            _ => false,
        }
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::Plain),
        any::<i128>().prop_map(Kind::Big),
        (any::<u128>(), proptest::option::of(".*")).prop_map(|(a, b)| Kind::Huge(a, b)),
        (
            proptest::collection::vec(any::<u8>(), 0..6),
            any::<(bool, i16)>()
        )
            .prop_map(|(sides, flags)| Kind::Shape { sides, flags }),
    ]
}

fn arb_flat() -> impl Strategy<Value = Msg> {
    (
        ".*",
        prop_oneof![
            any::<u64>().prop_map(f64::from_bits),
            Just(f64::NAN),
            Just(f64::INFINITY),
            Just(-0.0)
        ],
        any::<u64>(),
        proptest::collection::vec(arb_kind(), 0..4),
        proptest::collection::vec(any::<u8>(), 0..16),
        proptest::collection::btree_map(".{0,6}", proptest::option::of(any::<i32>()), 0..4),
        proptest::collection::btree_map(any::<i64>(), ".{0,4}", 0..4),
        any::<(u8, String)>(),
    )
        .prop_map(
            |(name, price, wide, kinds, raw, by_key, by_int, pair)| Msg {
                name,
                price,
                wide,
                kinds,
                raw,
                by_key,
                by_int,
                pair,
                nested: None,
            },
        )
}

fn arb_msg() -> impl Strategy<Value = Msg> {
    (arb_flat(), proptest::option::of(arb_flat())).prop_map(|(mut m, n)| {
        m.nested = n.map(Box::new);
        m
    })
}

#[test]
fn typed_values_survive_python() {
    let Some(py) = Python::start() else {
        return;
    };
    let py = std::cell::RefCell::new(py);
    proptest!(ProptestConfig::with_cases(200), |(m in arb_msg())| {
        let b = to_wire(&m).unwrap();
        let (again, ty) = py.borrow_mut().echo(&b);
        prop_assert_eq!(ty, "<class 'dict'>");
        let back: Msg = from_wire(&again).unwrap();
        prop_assert!(same(&m, &back), "{:?} != {:?}", m, back);
    });
}

#[test]
fn python_sees_the_python_types() {
    let Some(mut py) = Python::start() else {
        return;
    };
    let big = (1u128 << 64) + 5;
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            to_wire(&BTreeMap::from([("a", 1)])).unwrap(),
            "<class 'dict'>",
        ),
        (to_wire(&vec![1, 2]).unwrap(), "<class 'list'>"),
        (to_wire(&(1, "x")).unwrap(), "<class 'tuple'>"),
        (to_wire(&None::<u8>).unwrap(), "<class 'NoneType'>"),
        (to_wire(&()).unwrap(), "<class 'NoneType'>"),
        (to_wire("s").unwrap(), "<class 'str'>"),
        (to_wire(&'c').unwrap(), "<class 'str'>"),
        (
            to_wire(&serde_bytes::Bytes::new(b"b")).unwrap(),
            "<class 'bytes'>",
        ),
        (to_wire(&big).unwrap(), "<class 'int'>"),
        (to_wire(&f64::NAN).unwrap(), "<class 'float'>"),
        (to_wire(&Kind::Plain).unwrap(), "<class 'str'>"),
        (to_wire(&Kind::Big(1)).unwrap(), "<class 'dict'>"),
        (
            to_wire(&Value::Set(vec![Value::Int(1)])).unwrap(),
            "<class 'set'>",
        ),
    ];
    for (b, want) in cases {
        assert_eq!(py.echo(&b).1, want);
    }
    assert_eq!(py.check("x == 2**64 + 5", &to_wire(&big).unwrap()), "True");
    assert_eq!(
        py.check("x", &to_wire(&i128::MIN).unwrap()),
        "-170141183460469231731687303715884105728"
    );
    assert_eq!(
        py.check("x", &to_wire(&u128::MAX).unwrap()),
        "340282366920938463463374607431768211455"
    );
    assert_eq!(
        py.check("math.isnan(x)", &to_wire(&f64::NAN).unwrap()),
        "True"
    );
    assert_eq!(
        py.check(
            "x",
            &to_wire(&Kind::Shape {
                sides: vec![3],
                flags: (true, -1)
            })
            .unwrap()
        ),
        "{'Shape': {'sides': [3], 'flags': (True, -1)}}"
    );
    // Python's own encodings of ints equal ours, byte for byte.
    for v in [
        i128::from(i64::MAX) + 1,
        -(1 << 64),
        -(1 << 71),
        i128::MIN,
        i128::MAX,
    ] {
        assert_eq!(py.eval(&v.to_string()), to_wire(&v).unwrap(), "{v}");
    }
    assert_eq!(
        py.eval(&u128::MAX.to_string()),
        to_wire(&u128::MAX).unwrap()
    );
}

#[test]
fn python_values_into_value() {
    let Some(mut py) = Python::start() else {
        return;
    };
    let mut v = |expr: &str| -> Value {
        let b = py.eval(expr);
        let v: Value = from_wire(&b).unwrap_or_else(|e| panic!("{expr}: {e}"));
        // Back to the same bytes.
        assert_eq!(to_wire(&v).unwrap(), b, "{expr}");
        v
    };
    assert_eq!(
        v("datetime.datetime(2024, 2, 29, 13, 14, 15, 123456, tzinfo=datetime.timezone(datetime.timedelta(hours=-1)))"),
        Value::DateTime(DateTime {
            year: 2024,
            month: 2,
            day: 29,
            hour: 13,
            minute: 14,
            second: 15,
            microsecond: 123_456,
            fold: 0,
            tz: Tz::Fixed {
                offset_us: -3_600_000_000,
                name: None
            },
        })
    );
    assert!(matches!(
        v("datetime.datetime(2024, 1, 1, tzinfo=datetime.timezone.utc)"),
        Value::DateTime(DateTime { tz: Tz::Utc, .. })
    ));
    assert_eq!(
        v("datetime.date(1999, 12, 31)"),
        Value::Date(Date {
            year: 1999,
            month: 12,
            day: 31
        })
    );
    assert_eq!(
        v("datetime.time(1, 2, 3, 4)"),
        Value::Time(Time {
            hour: 1,
            minute: 2,
            second: 3,
            microsecond: 4,
            fold: 0,
            tz: Tz::Naive
        })
    );
    assert_eq!(
        v("datetime.timedelta(days=-1, seconds=5, microseconds=7)"),
        Value::TimeDelta(TimeDelta {
            days: -1,
            seconds: 5,
            microseconds: 7
        })
    );
    assert_eq!(v("decimal.Decimal('1.10')"), Value::Decimal("1.10".into()));
    let mut u = [0u8; 16];
    u[15] = 1;
    u[0] = 0x12;
    assert_eq!(v("uuid.UUID(int=(0x12 << 120) | 1)"), Value::Uuid(u));
    assert_eq!(v("{7}"), Value::Set(vec![Value::Int(7)]));
    assert_eq!(
        v("frozenset({'a'})"),
        Value::FrozenSet(vec![Value::from("a")])
    );
    assert_eq!(v("complex(1, -2)"), Value::Complex { re: 1.0, im: -2.0 });
    assert_eq!(v("bytearray(b'xy')"), Value::ByteArray(b"xy".to_vec()));
    assert_eq!(
        v("np.arange(6, dtype='<i4').reshape(2, 3)"),
        Value::NdArray(NdArray {
            descr: Box::new(Value::from("<i4")),
            shape: vec![2, 3],
            fortran: false,
            data: (0..6i32).flat_map(|i| i.to_le_bytes()).collect(),
            scalar: false,
        })
    );
    let Value::NdArray(f) = v("np.asfortranarray(np.arange(6.0).reshape(2, 3))") else {
        panic!("an array")
    };
    assert!(f.fortran && f.shape == [2, 3] && f.data.len() == 48);
    let Value::NdArray(s) = v("np.float64(1.5)") else {
        panic!("a numpy scalar")
    };
    assert!(s.scalar && s.shape.is_empty() && s.data == 1.5f64.to_le_bytes());
    let class = |q: &str| Class {
        module: "kameo_host_fixtures".into(),
        qualname: q.into(),
    };
    assert_eq!(
        v("fx.Point(1, 2)"),
        Value::Dataclass {
            class: class("Point"),
            fields: vec![("x".into(), Value::Int(1)), ("y".into(), Value::Int(2))],
        }
    );
    assert_eq!(
        v("fx.Color.RED"),
        Value::Enum {
            class: class("Color"),
            value: Box::new(Value::from("red")),
        }
    );
    assert_eq!(
        v("fx.Pair(1, 'b')"),
        Value::NamedTuple {
            class: class("Pair"),
            fields: vec![Value::Int(1), Value::from("b")],
        }
    );
    // A list held twice is a shared value on the wire: decoded in both places (as two
    // lists: a Value has no identity, so it does not encode back the same).
    assert_eq!(
        from_wire::<Value>(&py.eval("(lambda l: [l, l])([1, 2])")).unwrap(),
        Value::List(vec![
            Value::List(vec![Value::Int(1), Value::Int(2)]),
            Value::List(vec![Value::Int(1), Value::Int(2)]),
        ])
    );
    // Typed targets take what maps to them, and name what does not.
    #[derive(Deserialize, Debug, PartialEq)]
    struct Point {
        x: i64,
        y: i64,
    }
    #[derive(Deserialize, Debug, PartialEq)]
    enum Color {
        #[serde(rename = "red")]
        Red,
    }
    assert_eq!(
        from_wire::<Point>(&py.eval("fx.Point(3, 4)")).unwrap(),
        Point { x: 3, y: 4 }
    );
    assert_eq!(
        from_wire::<Color>(&py.eval("fx.Color.RED")).unwrap(),
        Color::Red
    );
    assert_eq!(
        from_wire::<(i64, String)>(&py.eval("fx.Pair(1, 'b')")).unwrap(),
        (1, "b".into())
    );
    assert_eq!(
        from_wire::<Vec<Vec<u8>>>(&py.eval("(lambda l: [l, l])([1, 2])")).unwrap(),
        [[1, 2], [1, 2]]
    );
    let e = from_wire::<BTreeMap<String, f64>>(
        &py.eval("{'a': 1.0, 'when': datetime.datetime(2024, 1, 1)}"),
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "at when: expected f64, got datetime.datetime (deserialize into kameo_host::Value to keep it)"
    );
}

#[test]
fn values_survive_python() {
    let Some(py) = Python::start() else {
        return;
    };
    let py = std::cell::RefCell::new(py);
    // Values whose Python form encodes back the same way (no sets of several items: their
    // order is Python's; no duplicate dict keys).
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<i128>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("nan", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".*".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::ByteArray),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        (1u16..10000, 1u8..13, 1u8..29, 0u32..1_000_000).prop_map(|(year, month, day, us)| {
            Value::DateTime(DateTime {
                year,
                month,
                day,
                hour: 23,
                minute: 59,
                second: 58,
                microsecond: us,
                fold: 0,
                tz: Tz::Utc,
            })
        }),
        "-?[1-9][0-9]{0,10}\\.[0-9]{1,5}".prop_map(Value::Decimal),
        Just(Value::Enum {
            class: Class {
                module: "kameo_host_fixtures".into(),
                qualname: "Color".into()
            },
            value: Box::new(Value::from("red"))
        }),
    ];
    let strat = leaf.prop_recursive(3, 24, 5, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..5).prop_map(Value::Tuple),
            proptest::collection::btree_map("[a-z]{0,4}", inner.clone(), 0..4).prop_map(|m| {
                Value::Dict(m.into_iter().map(|(k, v)| (Value::Str(k), v)).collect())
            }),
        ]
    });
    proptest!(ProptestConfig::with_cases(200), |(v in strat)| {
        let b = to_wire(&v).unwrap();
        let (again, _) = py.borrow_mut().echo(&b);
        prop_assert_eq!(&again, &b);
        prop_assert_eq!(from_wire::<Value>(&again).unwrap(), v);
    });
}
