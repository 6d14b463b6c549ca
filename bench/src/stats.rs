//! Small statistics over measured samples: medians and percentiles (linear interpolation
//! between closest ranks), and how numbers are printed in the report.

/// The `q`-quantile (0.0..=1.0) of `values`, interpolating between the closest ranks.
/// `None` for an empty sample.
pub fn quantile(values: &[f64], q: f64) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    let mut sorted = values.to_vec();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let rank = q.clamp(0.0, 1.0) * (sorted.len() - 1) as f64;
    let low = rank.floor() as usize;
    let high = rank.ceil() as usize;
    Some(sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64))
}

pub fn median(values: &[f64]) -> Option<f64> {
    quantile(values, 0.5)
}

/// Seconds with a precision that suits their size.
pub fn secs(value: f64) -> String {
    if value >= 100.0 {
        format!("{value:.0} s")
    } else if value >= 10.0 {
        format!("{value:.1} s")
    } else {
        format!("{value:.2} s")
    }
}

/// Milliseconds from seconds.
pub fn ms(seconds: f64) -> String {
    let value = seconds * 1000.0;
    if value >= 100.0 {
        format!("{value:.0} ms")
    } else if value >= 10.0 {
        format!("{value:.1} ms")
    } else {
        format!("{value:.2} ms")
    }
}

pub fn ratio(value: f64) -> String {
    format!("{value:.2}x")
}

pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "**missed**" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_between_ranks() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0]), Some(3.0));
        assert_eq!(median(&[5.0, 1.0, 3.0]), Some(3.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.0), Some(1.0));
        assert_eq!(quantile(&[1.0, 2.0, 3.0, 4.0, 5.0], 1.0), Some(5.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        let p99 = quantile(&hundred, 0.99).unwrap();
        assert!((p99 - 99.01).abs() < 1e-9, "{p99}");
    }

    #[test]
    fn numbers_print_with_sensible_precision() {
        assert_eq!(secs(123.4), "123 s");
        assert_eq!(secs(12.34), "12.3 s");
        assert_eq!(secs(1.234), "1.23 s");
        assert_eq!(ms(0.00123), "1.23 ms");
        assert_eq!(ms(0.0456), "45.6 ms");
        assert_eq!(ratio(1.104), "1.10x");
    }
}
