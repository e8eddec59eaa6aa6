use std::collections::{BTreeMap, HashMap};

use kameo_proto::wire::{self, put_str, put_varint, MAX_DEPTH};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

use super::*;

fn wv(b: &[u8]) -> wire::Value {
    wire::Value::decode(b).unwrap()
}

fn enc(w: &wire::Value) -> Vec<u8> {
    let mut b = Vec::new();
    w.encode(&mut b);
    b
}

fn s(x: &str) -> wire::Value {
    wire::Value::Str(x.into())
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
struct Order {
    symbol: String,
    qty: u32,
}

#[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
enum Side {
    Buy,
    Sell,
    Limit(f64),
    Pair(i32, String),
    Stop { at: f64, qty: Option<u32> },
}

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Book {
    orders: Vec<Order>,
}

#[test]
fn struct_is_a_dict_with_str_keys() {
    let b = to_wire(&Order {
        symbol: "ACME".into(),
        qty: 5,
    })
    .unwrap();
    assert_eq!(
        wv(&b),
        wire::Value::Dict(vec![
            (s("symbol"), s("ACME")),
            (s("qty"), wire::Value::Int(5))
        ])
    );
    let o: Order = from_wire(&b).unwrap();
    assert_eq!(o.qty, 5);
}

#[test]
fn scalars() {
    use wire::Value as W;
    assert_eq!(wv(&to_wire(&true).unwrap()), W::Bool(true));
    assert_eq!(wv(&to_wire(&-3i8).unwrap()), W::Int(-3));
    assert_eq!(wv(&to_wire(&u32::MAX).unwrap()), W::Int(u32::MAX.into()));
    assert_eq!(wv(&to_wire(&(i64::MAX as u64)).unwrap()), W::Int(i64::MAX));
    assert!(matches!(wv(&to_wire(&u64::MAX).unwrap()), W::BigInt(_)));
    assert_eq!(wv(&to_wire(&5i128).unwrap()), W::Int(5));
    assert_eq!(wv(&to_wire(&'é').unwrap()), s("é"));
    assert_eq!(wv(&to_wire(&()).unwrap()), W::None);
    assert_eq!(wv(&to_wire(&None::<u8>).unwrap()), W::None);
    assert_eq!(wv(&to_wire(&Some(2u8)).unwrap()), W::Int(2));
    assert_eq!(wv(&to_wire(&1.5f32).unwrap()), W::Float(1.5));
    let nan: f64 = from_wire(&to_wire(&f64::NAN).unwrap()).unwrap();
    assert!(nan.is_nan());
    let inf: f64 = from_wire(&to_wire(&f64::NEG_INFINITY).unwrap()).unwrap();
    assert_eq!(inf, f64::NEG_INFINITY);
    // 1 for 1.0.
    assert_eq!(from_wire::<f64>(&to_wire(&1i64).unwrap()).unwrap(), 1.0);
    assert_eq!(
        from_wire::<u64>(&to_wire(&u64::MAX).unwrap()).unwrap(),
        u64::MAX
    );
    assert_eq!(
        from_wire::<i128>(&to_wire(&i128::MIN).unwrap()).unwrap(),
        i128::MIN
    );
    assert_eq!(
        from_wire::<u128>(&to_wire(&u128::MAX).unwrap()).unwrap(),
        u128::MAX
    );
    // A small int into a wide type, a bigint that fits into a narrow one.
    assert_eq!(from_wire::<u128>(&to_wire(&7u8).unwrap()).unwrap(), 7);
    let mut b = vec![wire::TAG_BIGINT, 9];
    b.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(from_wire::<u8>(&b).unwrap(), 7);
}

#[test]
fn bytes_and_seqs() {
    use wire::Value as W;
    let b = to_wire(&serde_bytes::Bytes::new(b"ab")).unwrap();
    assert_eq!(wv(&b), W::Bytes(b"ab".to_vec()));
    let back: serde_bytes::ByteBuf = from_wire(&b).unwrap();
    assert_eq!(back.as_ref(), b"ab");
    // Vec<u8> without serde_bytes is a list, and takes bytes too.
    assert_eq!(
        wv(&to_wire(&vec![1u8, 2]).unwrap()),
        W::List(vec![W::Int(1), W::Int(2)])
    );
    assert_eq!(from_wire::<Vec<u8>>(&b).unwrap(), b"ab");
    let ba = enc(&W::ByteArray(vec![9]));
    assert_eq!(
        from_wire::<serde_bytes::ByteBuf>(&ba).unwrap().as_ref(),
        [9]
    );
    // Tuples both ways; a list into a tuple, a tuple into a Vec, a set into a Vec.
    let t = to_wire(&(1u8, "x")).unwrap();
    assert_eq!(wv(&t), W::Tuple(vec![W::Int(1), s("x")]));
    let l = enc(&W::List(vec![W::Int(1), s("x")]));
    assert_eq!(from_wire::<(u8, String)>(&l).unwrap(), (1, "x".into()));
    let set = enc(&W::FrozenSet(vec![W::Int(3)]));
    assert_eq!(from_wire::<Vec<i32>>(&set).unwrap(), [3]);
    let e = from_wire::<(u8, u8)>(&enc(&W::Tuple(vec![W::Int(1); 3]))).unwrap_err();
    assert_eq!(e.to_string(), "at $: expected 2 items, got 3");
    let e = from_wire::<(u8, String, u8)>(&t).unwrap_err();
    assert!(e.message.contains("invalid length 2"), "{e}");
}

#[test]
fn enums_externally_tagged() {
    use wire::Value as W;
    assert_eq!(wv(&to_wire(&Side::Buy).unwrap()), s("Buy"));
    assert_eq!(
        wv(&to_wire(&Side::Limit(1.5)).unwrap()),
        W::Dict(vec![(s("Limit"), W::Float(1.5))])
    );
    assert_eq!(
        wv(&to_wire(&Side::Pair(1, "a".into())).unwrap()),
        W::Dict(vec![(s("Pair"), W::Tuple(vec![W::Int(1), s("a")]))])
    );
    assert_eq!(
        wv(&to_wire(&Side::Stop { at: 2.0, qty: None }).unwrap()),
        W::Dict(vec![(
            s("Stop"),
            W::Dict(vec![(s("at"), W::Float(2.0)), (s("qty"), W::None)])
        )])
    );
    for v in [
        Side::Buy,
        Side::Sell,
        Side::Limit(3.0),
        Side::Pair(-1, "b".into()),
        Side::Stop {
            at: 1.0,
            qty: Some(3),
        },
    ] {
        assert_eq!(from_wire::<Side>(&to_wire(&v).unwrap()).unwrap(), v);
    }
    // A Python enum member: its value names the variant.
    let member = enc(&W::Object {
        tag: wire::TAG_ENUM,
        class: ("shop".into(), "Side".into()),
        fields: vec![(None, s("Sell"))],
    });
    assert_eq!(from_wire::<Side>(&member).unwrap(), Side::Sell);
    // `{"Buy": None}` is the unit variant too.
    assert_eq!(
        from_wire::<Side>(&enc(&W::Dict(vec![(s("Buy"), W::None)]))).unwrap(),
        Side::Buy
    );
    let e = from_wire::<Side>(&enc(&s("Limit"))).unwrap_err();
    assert!(e.message.contains("variant Limit holds a value"), "{e}");
    let e = from_wire::<Side>(&enc(&W::Dict(vec![]))).unwrap_err();
    assert!(e.message.contains("a dict of 0 keys"), "{e}");
    let e = from_wire::<Side>(&enc(&s("Hold"))).unwrap_err();
    assert!(e.message.contains("unknown variant `Hold`"), "{e}");
    let bad = enc(&W::Dict(vec![(
        s("Stop"),
        W::Dict(vec![(s("at"), s("x"))]),
    )]));
    let e = from_wire::<Side>(&bad).unwrap_err();
    assert_eq!(e.to_string(), "at Stop.at: expected f64, got str");
}

#[test]
fn maps_and_dataclasses() {
    use wire::Value as W;
    let m: BTreeMap<String, u32> = [("a".to_owned(), 1), ("b".to_owned(), 2)].into();
    let b = to_wire(&m).unwrap();
    assert_eq!(
        wv(&b),
        W::Dict(vec![(s("a"), W::Int(1)), (s("b"), W::Int(2))])
    );
    assert_eq!(from_wire::<BTreeMap<String, u32>>(&b).unwrap(), m);
    let vec_keys: BTreeMap<Vec<u8>, u8> = [(vec![1], 1)].into();
    let e = to_wire(&vec_keys).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at $[\"<key 0>\"]: a Python dict key must be hashable, and this key is a list (a sequence): use a tuple, str or int"
    );
    let tuple_keys: BTreeMap<(u8, u8), u8> = [((1, 2), 3)].into();
    assert_eq!(
        from_wire::<BTreeMap<(u8, u8), u8>>(&to_wire(&tuple_keys).unwrap()).unwrap(),
        tuple_keys
    );
    let ints: HashMap<i64, bool> = [(3, true)].into();
    assert_eq!(
        from_wire::<HashMap<i64, bool>>(&to_wire(&ints).unwrap()).unwrap(),
        ints
    );
    // A dataclass into a struct by field names; a NamedTuple or a list positionally.
    let dc = enc(&W::Object {
        tag: wire::TAG_DATACLASS,
        class: ("shop".into(), "Order".into()),
        fields: vec![
            (Some("qty".into()), W::Int(2)),
            (Some("symbol".into()), s("X")),
        ],
    });
    let want = Order {
        symbol: "X".into(),
        qty: 2,
    };
    assert_eq!(from_wire::<Order>(&dc).unwrap(), want);
    let nt = enc(&W::Object {
        tag: wire::TAG_NAMEDTUPLE,
        class: ("shop".into(), "Order".into()),
        fields: vec![(None, s("X")), (None, W::Int(2))],
    });
    assert_eq!(from_wire::<Order>(&nt).unwrap(), want);
    assert_eq!(from_wire::<(String, u8)>(&nt).unwrap(), ("X".into(), 2));
    let e = from_wire::<Order>(&enc(&W::Dict(vec![(s("symbol"), s("X"))]))).unwrap_err();
    assert_eq!(e.to_string(), "at $: missing field `qty`");
    // Unknown fields are skipped, whatever their type.
    let extra = enc(&W::Dict(vec![
        (s("note"), W::Uuid([1; 16])),
        (s("symbol"), s("X")),
        (s("qty"), W::Int(2)),
    ]));
    assert_eq!(from_wire::<Order>(&extra).unwrap(), want);
}

#[test]
fn error_paths_and_messages() {
    use wire::Value as W;
    let order = |qty: W| W::Dict(vec![(s("symbol"), s("A")), (s("qty"), qty)]);
    let book = |qty: W| {
        enc(&W::Dict(vec![(
            s("orders"),
            W::List(vec![
                order(W::Int(1)),
                order(W::Int(2)),
                order(W::Int(3)),
                order(qty),
            ]),
        )]))
    };
    let e = from_wire::<Book>(&book(s("7"))).unwrap_err();
    assert_eq!(e.path, "orders[3].qty");
    assert_eq!(e.to_string(), "at orders[3].qty: expected u32, got str");
    let e = from_wire::<Book>(&book(W::Int(-1))).unwrap_err();
    assert_eq!(
        e.to_string(),
        "at orders[3].qty: expected u32, got int -1 (out of range)"
    );
    let e = from_wire::<Book>(&book(W::Temporal {
        tag: wire::TAG_DATE,
        fixed: vec![0xe8, 0x07, 1, 2],
        tz: None,
    }))
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "at orders[3].qty: expected u32, got datetime.date (deserialize into kameo_host::Value to keep it)"
    );
    let e = from_wire::<Book>(&book(W::Object {
        tag: wire::TAG_DATACLASS,
        class: ("m".into(), "Point".into()),
        fields: vec![],
    }))
    .unwrap_err();
    assert!(e.message.contains("got dataclass m.Point"), "{e}");
    let e = from_wire::<Vec<u8>>(&enc(&W::List(vec![W::Int(1), W::Decimal("1.5".into())])))
        .unwrap_err();
    assert_eq!(e.path, "$[1]");
    assert!(e.message.contains("decimal.Decimal"), "{e}");
    let e = from_wire::<HashMap<String, u8>>(&enc(&W::Dict(vec![(s("a b"), W::Float(1.0))])))
        .unwrap_err();
    assert_eq!(e.to_string(), "at $[\"a b\"]: expected u8, got float");
    // Structure errors are at the root.
    let e = from_wire::<u8>(&[wire::TAG_INT, 1]).unwrap_err();
    assert_eq!(e.path, "$");
    assert!(e.message.contains("truncated"), "{e}");
    let e = from_wire::<u8>(&[wire::TAG_NONE, 0]).unwrap_err();
    assert!(e.message.contains("expected u8, got None"), "{e}");
    let e = from_wire::<()>(&[wire::TAG_NONE, 0]).unwrap_err();
    assert!(
        e.message.contains("unexpected bytes after the value"),
        "{e}"
    );
    let e = from_wire::<u8>(&[]).unwrap_err();
    assert!(e.message.contains("truncated"), "{e}");
    // A bigint beyond 128 bits.
    let mut big = vec![wire::TAG_BIGINT, 20];
    big.extend_from_slice(&[1; 20]);
    let e = from_wire::<i128>(&big).unwrap_err();
    assert!(e.message.contains("beyond 128 bits"), "{e}");
    assert!(matches!(
        from_wire::<Value>(&big).unwrap(),
        Value::BigInt(_)
    ));
    // Serializer errors carry the path too.
    struct Bad;
    impl Serialize for Bad {
        fn serialize<S: serde::Serializer>(&self, _: S) -> Result<S::Ok, S::Error> {
            Err(serde::ser::Error::custom("no"))
        }
    }
    #[derive(Serialize)]
    struct Holder {
        items: Vec<Bad>,
    }
    let mut out = vec![1, 2];
    let e = to_wire_into(&mut out, &Holder { items: vec![Bad] }).unwrap_err();
    assert_eq!(e.to_string(), "at items[0]: no");
    assert_eq!(out, [1, 2], "left as it was");
}

#[test]
fn depth_limits() {
    // Deserializing: nesting past MAX_DEPTH is an error, into a typed target and into Value.
    let mut b = [wire::TAG_LIST, 1].repeat(MAX_DEPTH + 1);
    b.push(wire::TAG_NONE);
    assert!(from_wire::<Value>(&b)
        .unwrap_err()
        .message
        .contains("deeper"));
    assert!(from_wire::<serde::de::IgnoredAny>(&b).is_err());
    #[derive(Deserialize, Serialize, Debug)]
    enum Tree {
        Leaf,
        Node(Vec<Tree>),
    }
    let mut deep = Tree::Leaf;
    for _ in 0..MAX_DEPTH {
        deep = Tree::Node(vec![deep]);
    }
    // Each level is a dict and a list: twice the depth.
    let e = to_wire(&deep).unwrap_err();
    assert!(e.message.contains("deeper than 512"), "{e}");
    let mut ok = Tree::Leaf;
    for _ in 0..100 {
        ok = Tree::Node(vec![ok]);
    }
    let b = to_wire(&ok).unwrap();
    from_wire::<Tree>(&b).unwrap();
}

#[test]
fn shared_values_are_decoded_wherever_referenced() {
    use wire::Value as W;
    // [shared {"symbol": "A", "qty": 1}, ref 0, ref 0]
    let shared = W::Dict(vec![(s("symbol"), s("A")), (s("qty"), W::Int(1))]);
    let b = enc(&W::List(vec![
        W::Shared(Box::new(shared)),
        W::Ref(0),
        W::Ref(0),
    ]));
    let v: Vec<Order> = from_wire(&b).unwrap();
    assert_eq!(v.len(), 3);
    assert!(v.iter().all(|o| o.symbol == "A" && o.qty == 1));
    let v: Value = from_wire(&b).unwrap();
    let Value::List(items) = &v else { panic!() };
    assert_eq!(items[0], items[2]);
    // A shared value inside a skipped field, referred to later.
    let b = enc(&W::Dict(vec![
        (s("x"), W::Shared(Box::new(W::List(vec![W::Int(5)])))),
        (s("symbol"), s("A")),
        (s("qty"), W::Int(1)),
        (s("y"), W::Ref(0)),
    ]));
    #[derive(Deserialize)]
    struct Y {
        y: Vec<u8>,
    }
    assert_eq!(from_wire::<Y>(&b).unwrap().y, [5]);
    // ... and inside a Value field, referred to by a typed one.
    #[derive(Deserialize)]
    struct XY {
        x: Value,
        y: Vec<u8>,
    }
    let xy: XY = from_wire(&b).unwrap();
    assert_eq!(xy.x, Value::List(vec![Value::Int(5)]));
    assert_eq!(xy.y, [5]);
    // Nested: a shared value inside another, both referred to.
    let b = enc(&W::List(vec![
        W::Shared(Box::new(W::List(vec![W::Shared(Box::new(W::List(vec![
            W::Int(1),
        ])))]))),
        W::Ref(1),
        W::Ref(0),
    ]));
    let v: (Vec<Vec<u8>>, Vec<Vec<u8>>, Vec<u8>) = from_wire(&enc(&W::Tuple(match wv(&b) {
        W::List(items) => items,
        _ => unreachable!(),
    })))
    .unwrap();
    assert_eq!(v, (vec![vec![1]], vec![vec![1]], vec![1]));
    let v: Value = from_wire(&b).unwrap();
    assert_eq!(
        v,
        Value::List(vec![
            Value::List(vec![Value::List(vec![Value::Int(1)])]),
            Value::List(vec![Value::List(vec![Value::Int(1)])]),
            Value::List(vec![Value::Int(1)]),
        ])
    );
    // Invalid references are errors.
    assert!(from_wire::<Value>(&[wire::TAG_REF, 0]).is_err());
    assert!(from_wire::<Vec<u8>>(&[wire::TAG_LIST, 1, wire::TAG_REF, 0]).is_err());
}

#[test]
fn reference_bombs_are_bounded() {
    // Each shared list holds the previous one twice: 2^40 items from a few hundred bytes.
    let mut b = vec![wire::TAG_LIST, 41];
    b.extend_from_slice(&[wire::TAG_SHARED, wire::TAG_LIST, 1, wire::TAG_NONE]);
    for i in 0..40u64 {
        b.extend_from_slice(&[wire::TAG_SHARED, wire::TAG_LIST, 2, wire::TAG_REF]);
        put_varint(&mut b, i);
        b.push(wire::TAG_REF);
        put_varint(&mut b, i);
    }
    wire::Value::decode(&b).unwrap();
    let e = from_wire::<Value>(&b).unwrap_err();
    assert!(e.message.contains("references expand"), "{e}");
    let e = from_wire::<serde_json::Value>(&b).unwrap_err();
    assert!(e.message.contains("references expand"), "{e}");
    // Skipped, it costs nothing.
    from_wire::<serde::de::IgnoredAny>(&b).unwrap();
}

#[test]
fn segments() {
    let seg = b"hello world".as_slice();
    let mut b = vec![wire::TAG_SHM_BYTES, 0];
    wire::ShmRef {
        fd: 0,
        offset: 6,
        len: 5,
    }
    .write(&mut b);
    let got: serde_bytes::ByteBuf = from_wire_with_segments(&b, &[seg]).unwrap();
    assert_eq!(got.as_ref(), b"world");
    assert_eq!(
        from_wire_with_segments::<Value>(&b, &[seg]).unwrap(),
        Value::Bytes(b"world".to_vec())
    );
    let e = from_wire::<serde_bytes::ByteBuf>(&b).unwrap_err();
    assert!(
        e.message.contains("descriptor 0 but the frame carried 0"),
        "{e}"
    );
    let mut over = vec![wire::TAG_SHM_BYTES, 1];
    wire::ShmRef {
        fd: 0,
        offset: 6,
        len: 6,
    }
    .write(&mut over);
    let e = from_wire_with_segments::<Value>(&over, &[seg]).unwrap_err();
    assert!(e.message.contains("beyond its segment of 11 bytes"), "{e}");
    let mut huge = vec![wire::TAG_SHM_BYTES, 0];
    wire::ShmRef {
        fd: 0,
        offset: u64::MAX,
        len: 2,
    }
    .write(&mut huge);
    assert!(from_wire_with_segments::<Value>(&huge, &[seg]).is_err());
    // An array's data in a segment.
    let arr = wire::Value::Array {
        tag: wire::TAG_NDARRAY,
        descr: Box::new(s("|u1")),
        shape: vec![3],
        fortran: false,
        data: wire::Data::Shm(wire::ShmRef {
            fd: 1,
            offset: 0,
            len: 3,
        }),
    };
    let v: Value = from_wire_with_segments(&enc(&arr), &[seg, b"abc"]).unwrap();
    let Value::NdArray(a) = v else { panic!() };
    assert_eq!(
        (a.data.as_slice(), a.shape.as_slice()),
        (b"abc".as_slice(), [3u64].as_slice())
    );
}

#[test]
fn value_of_every_type() {
    use wire::Value as W;
    let class = ("m".to_owned(), "C".to_owned());
    let all = W::List(vec![
        W::None,
        W::Bool(true),
        W::Int(-1),
        W::BigInt(vec![0, 0, 0, 0, 0, 0, 0, 0, 1]),
        W::Float(0.5),
        s("s"),
        W::Bytes(vec![1]),
        W::ByteArray(vec![2]),
        W::Tuple(vec![W::Int(1)]),
        W::Dict(vec![(W::Int(1), s("x"))]),
        W::Set(vec![W::Int(1)]),
        W::FrozenSet(vec![s("f")]),
        W::Complex(1.0, -2.0),
        W::Temporal {
            tag: wire::TAG_DATETIME,
            fixed: vec![0xe8, 0x07, 2, 29, 13, 14, 15, 0x40, 0xe2, 0x01, 0, 1],
            tz: Some(wire::Tz::Fixed {
                offset_us: -3_600_000_000,
                name: None,
            }),
        },
        W::Temporal {
            tag: wire::TAG_TIMEDELTA,
            fixed: [
                (-1i32).to_le_bytes(),
                5i32.to_le_bytes(),
                7i32.to_le_bytes(),
            ]
            .concat(),
            tz: None,
        },
        W::Decimal("1.10".into()),
        W::Uuid([7; 16]),
        W::Object {
            tag: wire::TAG_ENUM,
            class: class.clone(),
            fields: vec![(None, W::Int(2))],
        },
        W::Object {
            tag: wire::TAG_DATACLASS,
            class: class.clone(),
            fields: vec![(Some("a".into()), W::Int(1))],
        },
        W::Object {
            tag: wire::TAG_NAMEDTUPLE,
            class: class.clone(),
            fields: vec![(None, W::Int(1))],
        },
        W::Array {
            tag: wire::TAG_NPSCALAR,
            descr: Box::new(s("<f8")),
            shape: vec![],
            fortran: false,
            data: wire::Data::Inline(1.0f64.to_le_bytes().to_vec()),
        },
        W::Pickle(vec![0x80]),
        W::Remote {
            worker: 1,
            number: 2,
            type_name: "Counter".into(),
        },
        W::Subclass {
            class,
            value: Box::new(s("sub")),
        },
    ]);
    let b = enc(&all);
    let v: Value = from_wire(&b).unwrap();
    let Value::List(items) = &v else { panic!() };
    assert_eq!(items[3].as_u128(), Some(1 << 64));
    assert_eq!(
        items[13],
        Value::DateTime(DateTime {
            year: 2024,
            month: 2,
            day: 29,
            hour: 13,
            minute: 14,
            second: 15,
            microsecond: 123_456,
            fold: 1,
            tz: Tz::Fixed {
                offset_us: -3_600_000_000,
                name: None
            },
        })
    );
    assert_eq!(
        items[14],
        Value::TimeDelta(TimeDelta {
            days: -1,
            seconds: 5,
            microseconds: 7
        })
    );
    assert_eq!(items[18].get("a"), Some(&Value::Int(1)));
    assert_eq!(items[20].type_name(), "numpy scalar");
    // Back to exactly the same bytes.
    assert_eq!(to_wire(&v).unwrap(), b);
    // Values inside typed structures, both ways.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Env {
        id: u32,
        payload: Value,
        extra: Option<Value>,
    }
    let e = Env {
        id: 1,
        payload: v.clone(),
        extra: Some(Value::Set(vec![Value::Int(1)])),
    };
    let eb = to_wire(&e).unwrap();
    assert_eq!(from_wire::<Env>(&eb).unwrap(), e);
    // The plain mapping for other formats.
    let j = serde_json::to_value(&v).unwrap();
    assert_eq!(j[3], serde_json::json!("18446744073709551616"));
    assert_eq!(j[10], serde_json::json!([1]));
    assert_eq!(j[13], serde_json::json!("2024-02-29T13:14:15.123456-01:00"));
    assert_eq!(
        j[16],
        serde_json::json!("07070707-0707-0707-0707-070707070707")
    );
    assert_eq!(j[17], serde_json::json!(2));
    assert_eq!(j[18], serde_json::json!({"a": 1}));
    let back: Value = serde_json::from_str(r#"{"a": [1, 2.5, null, "x", true]}"#).unwrap();
    assert_eq!(
        back,
        Value::Dict(vec![(
            Value::from("a"),
            Value::List(vec![
                Value::Int(1),
                Value::Float(2.5),
                Value::None,
                Value::from("x"),
                Value::Bool(true)
            ])
        )])
    );
    // serde_json::Value through to_wire: plain dict/list/str/int/float/bool/None.
    let j = serde_json::json!({"a": [1, 2.5, null, "x", true]});
    let b = to_wire(&j).unwrap();
    assert_eq!(from_wire::<Value>(&b).unwrap(), back);
    assert_eq!(from_wire::<serde_json::Value>(&b).unwrap(), j);
}

#[test]
fn borrowed() {
    #[derive(Deserialize)]
    struct B<'a> {
        #[serde(borrow)]
        symbol: &'a str,
        #[serde(with = "serde_bytes")]
        raw: &'a [u8],
    }
    let mut b = vec![wire::TAG_DICT, 2, wire::TAG_STR];
    put_str(&mut b, "symbol");
    b.push(wire::TAG_STR);
    put_str(&mut b, "ACME");
    b.push(wire::TAG_STR);
    put_str(&mut b, "raw");
    b.push(wire::TAG_BYTES);
    put_str(&mut b, "xy");
    let v: B = from_wire_borrowed(&b).unwrap();
    assert_eq!((v.symbol, v.raw), ("ACME", b"xy".as_slice()));
}

#[test]
fn unknown_lengths_are_patched() {
    // A flattened struct serializes as a map of unknown length.
    #[derive(Serialize, Deserialize, PartialEq, Debug)]
    struct Outer {
        id: u8,
        #[serde(flatten)]
        order: Order,
        #[serde(skip_serializing_if = "Option::is_none")]
        note: Option<String>,
    }
    let o = Outer {
        id: 1,
        order: Order {
            symbol: "A".into(),
            qty: 2,
        },
        note: None,
    };
    let b = to_wire(&o).unwrap();
    let wire::Value::Dict(items) = wv(&b) else {
        panic!()
    };
    assert_eq!(items.len(), 3);
    assert_eq!(from_wire::<Outer>(&b).unwrap(), o);
    // 200 items from an iterator of unknown length: the count takes two bytes.
    struct Unknown;
    impl Serialize for Unknown {
        fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq((0..200u32).filter(|_| true))
        }
    }
    let b = to_wire(&Unknown).unwrap();
    assert_eq!(
        from_wire::<Vec<u32>>(&b).unwrap(),
        (0..200).collect::<Vec<_>>()
    );
}

// Property tests.

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Kind {
    A,
    B(i128),
    C(u128, Option<String>),
    D { x: Vec<u8>, y: (bool, i16) },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Inner {
    kind: Kind,
    #[serde(with = "serde_bytes")]
    raw: Vec<u8>,
    maybe: Option<Box<Inner>>,
}

#[derive(Serialize, Deserialize, Debug, Clone)]
struct Outer {
    name: String,
    price: f64,
    small: f32,
    wide: u64,
    items: Vec<Inner>,
    by_key: BTreeMap<String, Option<i32>>,
    by_int: BTreeMap<i64, char>,
    tuple: (u8, i8, String),
    unit: (),
}

fn arb_kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        Just(Kind::A),
        any::<i128>().prop_map(Kind::B),
        (any::<u128>(), proptest::option::of(".*")).prop_map(|(a, b)| Kind::C(a, b)),
        (
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<(bool, i16)>()
        )
            .prop_map(|(x, y)| Kind::D { x, y }),
    ]
}

fn arb_inner() -> impl Strategy<Value = Inner> {
    let leaf =
        (arb_kind(), proptest::collection::vec(any::<u8>(), 0..16)).prop_map(|(kind, raw)| Inner {
            kind,
            raw,
            maybe: None,
        });
    leaf.prop_recursive(3, 8, 1, |inner| {
        (
            arb_kind(),
            proptest::collection::vec(any::<u8>(), 0..4),
            inner,
        )
            .prop_map(|(kind, raw, i)| Inner {
                kind,
                raw,
                maybe: Some(Box::new(i)),
            })
    })
}

fn arb_outer() -> impl Strategy<Value = Outer> {
    (
        ".*",
        any::<u64>().prop_map(f64::from_bits),
        any::<u32>().prop_map(f32::from_bits),
        any::<u64>(),
        proptest::collection::vec(arb_inner(), 0..4),
        proptest::collection::btree_map(".{0,6}", proptest::option::of(any::<i32>()), 0..4),
        proptest::collection::btree_map(any::<i64>(), any::<char>(), 0..4),
        any::<(u8, i8, String)>(),
    )
        .prop_map(
            |(name, price, small, wide, items, by_key, by_int, tuple)| Outer {
                name,
                price,
                small,
                wide,
                items,
                by_key,
                by_int,
                tuple,
                unit: (),
            },
        )
}

/// Equal, f64 by its bits (nan included); an f32 passes as an f64 (a Python float), where a
/// signalling nan may come back quiet.
fn same(a: &Outer, b: &Outer) -> bool {
    a.price.to_bits() == b.price.to_bits()
        && (a.small.to_bits() == b.small.to_bits() || a.small.is_nan() && b.small.is_nan())
        && a.name == b.name
        && a.wide == b.wide
        && a.items == b.items
        && a.by_key == b.by_key
        && a.by_int == b.by_int
        && a.tuple == b.tuple
}

pub(crate) fn arb_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::None),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<i128>().prop_map(Value::from),
        any::<u128>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("nan != nan", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".*".prop_map(Value::Str),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::Bytes),
        proptest::collection::vec(any::<u8>(), 0..8).prop_map(Value::ByteArray),
        any::<[u8; 16]>().prop_map(Value::Uuid),
        (any::<u16>(), 1u8..13, 1u8..29, any::<u32>()).prop_map(|(year, month, day, us)| {
            Value::DateTime(DateTime {
                year,
                month,
                day,
                hour: 1,
                minute: 2,
                second: 3,
                microsecond: us % 1_000_000,
                fold: 0,
                tz: Tz::Zone("Europe/Paris".into()),
            })
        }),
        "-?[0-9]{1,20}\\.[0-9]{1,5}".prop_map(Value::Decimal),
    ];
    leaf.prop_recursive(3, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Tuple),
            proptest::collection::vec((any::<i64>().prop_map(Value::Int), inner.clone()), 0..6)
                .prop_map(Value::Dict),
            proptest::collection::vec(any::<i64>().prop_map(Value::Int), 0..6).prop_map(Value::Set),
            proptest::collection::vec(("[a-z]{1,5}", inner.clone()), 0..4).prop_map(|f| {
                Value::Dataclass {
                    class: Class {
                        module: "m".into(),
                        qualname: "D".into(),
                    },
                    fields: f,
                }
            }),
            inner.prop_map(|v| Value::Enum {
                class: Class {
                    module: "m".into(),
                    qualname: "E".into(),
                },
                value: Box::new(v),
            }),
        ]
    })
}

proptest! {
    #[test]
    fn typed_round_trip(v in arb_outer()) {
        let b = to_wire(&v).unwrap();
        // What we write, kameo-proto's decoder reads.
        wire::Value::decode(&b).unwrap();
        let back: Outer = from_wire(&b).unwrap();
        prop_assert!(same(&v, &back), "{v:?} != {back:?}");
    }

    #[test]
    fn value_round_trip(v in arb_value()) {
        let b = to_wire(&v).unwrap();
        let back: Value = from_wire(&b).unwrap();
        prop_assert_eq!(&back, &v);
        prop_assert_eq!(to_wire(&back).unwrap(), b);
    }

    #[test]
    fn random_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = from_wire::<Value>(&b);
        let _ = from_wire::<Outer>(&b);
        let _ = from_wire::<Vec<Kind>>(&b);
        let _ = from_wire::<serde_json::Value>(&b);
        let _ = from_wire::<serde::de::IgnoredAny>(&b);
        let _ = from_wire_with_segments::<Value>(&b, &[b"0123456789"]);
        let _ = from_wire_with_segments::<serde_bytes::ByteBuf>(&b, &[b"0123456789"]);
    }

    #[test]
    fn mutated_encodings_never_panic(v in arb_outer(), at in any::<prop::sample::Index>(), byte in any::<u8>(), cut in any::<prop::sample::Index>()) {
        let mut b = to_wire(&v).unwrap();
        let i = at.index(b.len());
        b[i] = byte;
        let _ = from_wire::<Outer>(&b);
        let _ = from_wire::<Value>(&b);
        let cut = cut.index(b.len());
        prop_assert!(from_wire::<Outer>(&to_wire(&v).unwrap()[..cut]).is_err());
    }
}

#[test]
fn deepest_input_into_recursive_targets_fits_the_stack() {
    // MAX_DEPTH nested lists: within the limit, into recursive targets on a test thread's
    // stack (the deserializer recurses once per level).
    let mut b = [wire::TAG_LIST, 1].repeat(MAX_DEPTH - 1);
    b.push(wire::TAG_NONE);
    from_wire::<Value>(&b).unwrap();
    from_wire::<serde::de::IgnoredAny>(&b).unwrap();
    #[derive(Deserialize)]
    #[allow(dead_code)]
    struct Nest(Vec<Option<Box<Nest>>>);
    from_wire::<Nest>(&b).unwrap();
    // serde_json's Value refuses past its own limit (128) but must not overflow.
    let _ = from_wire::<serde_json::Value>(&b);
    // With a reference at the bottom, resolved before it reaches Value.
    let mut r = vec![wire::TAG_LIST, 2, wire::TAG_SHARED, wire::TAG_LIST, 0];
    r.extend([wire::TAG_LIST, 1].repeat(MAX_DEPTH - 3));
    r.extend([wire::TAG_REF, 0]);
    from_wire::<Value>(&r).unwrap();
    from_wire::<Nest>(&r).unwrap();
}

#[test]
fn buffered_forms_through_deserialize_any() {
    // Internally tagged and untagged enums, and flatten, buffer through deserialize_any.
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(tag = "type")]
    enum Event {
        Fill { price: f64, qty: u32 },
        Cancel { id: u64 },
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    #[serde(untagged)]
    enum Either {
        Num(i64),
        Text(String),
        Pair(u8, u8),
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    struct Flat {
        id: u8,
        #[serde(flatten)]
        rest: BTreeMap<String, i64>,
    }
    for e in [
        Event::Fill { price: 1.5, qty: 2 },
        Event::Cancel { id: u64::MAX },
    ] {
        assert_eq!(from_wire::<Event>(&to_wire(&e).unwrap()).unwrap(), e);
    }
    for e in [
        Either::Num(-4),
        Either::Text("t".into()),
        Either::Pair(1, 2),
    ] {
        assert_eq!(from_wire::<Either>(&to_wire(&e).unwrap()).unwrap(), e);
    }
    let f = Flat {
        id: 1,
        rest: [("a".to_owned(), 2)].into(),
    };
    assert_eq!(from_wire::<Flat>(&to_wire(&f).unwrap()).unwrap(), f);
}
