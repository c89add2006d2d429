//! The fuzz targets on stable, without cargo-fuzz: every committed seed of
//! every target (tests/fuzz/corpus/TARGET/, crash reproducers included, named
//! `regress-*`), then seeded mutations of them, through the same functions
//! cargo-fuzz calls (`switchyard::fuzzing`). Each target's function asserts
//! its own invariants (docs/fuzzing.md); a panic fails the test.
//!
//! Bounded: at most `MUTATIONS` mutated inputs per target and `BUDGET` of
//! wall time for them (the seeds always all run). The mutations are the
//! same on every run; `FUZZ_SMOKE_SEED=<n>` picks another sequence.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use switchyard::fuzzing::{SplitMix, TARGETS};

const MUTATIONS: usize = 4000;
const BUDGET: Duration = Duration::from_secs(20);
const MAX_INPUT: usize = 64 * 1024;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fuzz")
}

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let path = e.unwrap().path();
            (path.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&path).unwrap())
        })
        .collect();
    out.sort();
    out
}

/// Bytes the mutations insert: what the parsers under test look for.
const TOKENS: &[&[u8]] = &[
    b"\r\n", b"\r\n\r\n", b"\n", b" ", b":", b",", b";", b"=", b"/", b"?", b"*.", b"@", b"%", b"\"", b"[", b"]", b"{", b"}",
    b"0", b"00", b"9", b"ffffffffffffffff", b"18446744073709551616", b"-1", b"+1",
    b"Host: ", b"Content-Length: ", b"Transfer-Encoding: chunked", b"Connection: close", b"Upgrade: h2c",
    b"HTTP/1.1", b"HTTP/1.0", b"GET ", b"POST ", b"\r\n\t", b"\xff", b"\x00",
    b"switchyard.", b"host=", b"path=", b"null", b"true", b"[]", b"{}", b"\"Port\":", b"\"Address\":\"::1\"",
];

fn mutate(rng: &mut SplitMix, input: &[u8], others: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                const BYTES: &[u8] = b"\x00\xff\r\n: ,;09aAF/";
                v[i] = BYTES[rng.below(BYTES.len())];
            }
            2 | 3 => {
                let t = TOKENS[rng.below(TOKENS.len())];
                let at = rng.below(len + 1);
                v.splice(at..at, t.iter().copied());
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                v.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(256));
                let piece = v[at..at + n].to_vec();
                let to = rng.below(len + 1);
                v.splice(to..to, piece);
            }
            _ if !others.is_empty() => {
                // Splice: this input's start, another seed's end.
                let other = &others[rng.below(others.len())].1;
                let cut = rng.below(len + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[rng.below(other.len() + 1)..]);
            }
            _ => {}
        }
    }
    v.truncate(MAX_INPUT);
    v
}

/// A stable number for a target's name (FNV-1a), so each target gets its
/// own mutation sequence.
fn name_seed(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn run(target: &str) {
    let (_, f) = TARGETS.iter().find(|(n, _)| *n == target).expect("a target of that name");
    let seeds = seeds(target);
    assert!(!seeds.is_empty(), "{target}: no seeds");
    for (name, data) in &seeds {
        let r = std::panic::catch_unwind(|| f(data));
        assert!(r.is_ok(), "{target}: seed {name} failed (tests/fuzz/corpus/{target}/{name})");
    }
    let base: u64 = std::env::var("FUZZ_SMOKE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed);
    let mut rng = SplitMix(base ^ name_seed(target));
    let started = Instant::now();
    let mut done = 0;
    while done < MUTATIONS && started.elapsed() < BUDGET {
        let (name, seed) = &seeds[rng.below(seeds.len())];
        let input = mutate(&mut rng, seed, &seeds);
        if std::panic::catch_unwind(|| f(&input)).is_err() {
            panic!(
                "{target}: mutation {done} of seed {name} failed; input (escaped): \"{}\"",
                input.escape_ascii()
            );
        }
        done += 1;
    }
    println!("{target}: {} seeds, {done} mutations in {:?}", seeds.len(), started.elapsed());
    assert!(done > 0, "{target}: no mutation ran");
}

#[test]
fn every_target_has_seeds_and_a_cargo_fuzz_target() {
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for (name, _) in TARGETS {
        let source = std::fs::read_to_string(fuzz_dir().join("fuzz_targets").join(format!("{name}.rs"))).unwrap_or_default();
        assert!(source.contains(&format!("switchyard::fuzzing::{name}(")), "tests/fuzz/fuzz_targets/{name}.rs calls {name}");
        assert!(manifest.contains(&format!("name = \"{name}\"")), "tests/fuzz/Cargo.toml lists {name}");
        assert!(!seeds(name).is_empty());
        assert!(include_str!("fuzz_smoke.rs").contains(&format!("run(\"{name}\")")), "a test here runs {name}");
    }
    let size: u64 = TARGETS.iter().flat_map(|(n, _)| seeds(n)).map(|(_, d)| d.len() as u64).sum();
    assert!(size < 1024 * 1024, "seed corpora are {size} bytes; keep them small");
}

#[test]
fn mutations_are_deterministic() {
    let seeds = seeds("request_head");
    let make = || {
        let mut rng = SplitMix(7);
        (0..50).map(|i| mutate(&mut rng, &seeds[i % seeds.len()].1, &seeds)).collect::<Vec<_>>()
    };
    let a = make();
    assert_eq!(a, make());
    assert!(a.iter().zip(seeds.iter().cycle()).any(|(m, (_, s))| m != s), "mutations change something");
}

#[test]
fn request_head() {
    run("request_head");
}

#[test]
fn response_head() {
    run("response_head");
}

#[test]
fn chunked() {
    run("chunked");
}

#[test]
fn request_differential() {
    run("request_differential");
}

#[test]
fn inbound() {
    run("inbound");
}

#[test]
fn config() {
    run("config");
}

#[test]
fn consul() {
    run("consul");
}

#[test]
fn catalog() {
    run("catalog");
}

#[test]
fn tags() {
    run("tags");
}

#[test]
fn matcher() {
    run("matcher");
}
