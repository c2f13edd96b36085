//! `--router-skew`: the flag's parser (and the finite, non-negative number check it shares with
//! other flags), shared by the roles that build a router (the gate, and
//! `moemesh generate`/`bench` in process). The bias itself is computed in one place, the
//! engine's `router::zipf_skew`.

/// `--router-skew`: a Zipf exponent, finite and 0 or more (0: off).
pub fn parse_router_skew(s: &str) -> Result<f32, String> {
    Ok(finite_non_negative("--router-skew", s)? as f32)
}

/// A flag's value that must be a finite number, 0 or more (`--router-skew`, the gate's
/// `--host-kv-cache-gb`): the error names the flag and the rule.
pub fn finite_non_negative(flag: &str, s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("{flag}: {s:?} is not a number ({e})"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!(
            "{flag}: {s}; it must be a finite number, 0 or more"
        ));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::parse_router_skew;

    #[test]
    fn the_skew_is_a_finite_non_negative_exponent() {
        assert_eq!(parse_router_skew("0"), Ok(0.0));
        assert_eq!(parse_router_skew("1.2"), Ok(1.2));
        for bad in ["-0.5", "NaN", "inf", "x"] {
            let err = parse_router_skew(bad).expect_err(bad);
            assert!(err.starts_with("--router-skew: "), "{err}");
        }
    }
}
