//! Charts drawn on the server as SVG: a line through a series' points, a
//! dot on each (so a single sample shows), and the extremes written on the
//! axis. No charting library ships to the browser.

use std::fmt::Write as _;

/// One point: when (ms since the epoch) and the value.
pub type Point = (i64, f64);

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 160.0;
const PAD: f64 = 28.0;

/// An SVG chart of `points` titled `title` over `[from_ms, to_ms]`, values
/// in `[0, max]` (`max` grows to the largest value).
pub fn line_chart(
    title: &str,
    unit: &str,
    points: &[Point],
    from_ms: i64,
    to_ms: i64,
    max: f64,
) -> String {
    let max = points.iter().map(|p| p.1).fold(max, f64::max).max(1.0);
    let span = (to_ms - from_ms).max(1) as f64;
    let x = |at: i64| PAD + (at - from_ms) as f64 / span * (WIDTH - 2.0 * PAD);
    let y = |value: f64| HEIGHT - PAD - value / max * (HEIGHT - 2.0 * PAD);
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{title}" data-points="{}">"#,
        points.len()
    );
    let _ = write!(
        svg,
        r#"<text x="{PAD}" y="14" class="title">{}</text>"#,
        escape(title)
    );
    let _ = write!(
        svg,
        r#"<line x1="{PAD}" y1="{bottom}" x2="{right}" y2="{bottom}" class="axis"/><line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{bottom}" class="axis"/>"#,
        bottom = HEIGHT - PAD,
        right = WIDTH - PAD
    );
    let _ = write!(
        svg,
        r#"<text x="2" y="{}" class="tick">{max:.0}{unit}</text><text x="2" y="{}" class="tick">0</text>"#,
        PAD + 4.0,
        HEIGHT - PAD
    );
    if points.is_empty() {
        let _ = write!(
            svg,
            r#"<text x="{}" y="{}" class="empty">no samples in this window</text>"#,
            WIDTH / 2.0 - 70.0,
            HEIGHT / 2.0
        );
    } else {
        let path: Vec<String> = points
            .iter()
            .map(|(at, value)| format!("{:.1},{:.1}", x(*at), y(*value)))
            .collect();
        let _ = write!(
            svg,
            r#"<polyline class="line" points="{}"/>"#,
            path.join(" ")
        );
        for (at, value) in points {
            let _ = write!(
                svg,
                r#"<circle class="point" cx="{:.1}" cy="{:.1}" r="2.5"><title>{value:.1}{unit}</title></circle>"#,
                x(*at),
                y(*value)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_point_is_a_dot_and_an_empty_window_says_so() {
        let svg = line_chart(
            "mem used",
            "%",
            &[(0, 10.0), (50, 20.0), (100, 90.0)],
            0,
            100,
            100.0,
        );
        assert_eq!(svg.matches("<circle").count(), 3);
        assert!(svg.contains(r#"data-points="3""#));
        let empty = line_chart("disk <free>", "%", &[], 0, 100, 100.0);
        assert!(empty.contains("no samples") && empty.contains("disk &lt;free&gt;"));
    }
}
