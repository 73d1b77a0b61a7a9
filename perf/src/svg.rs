//! A latency-percentile plot as a self-contained SVG: one line per series,
//! percentiles on a "nines" axis (50, 90, 99, 99.9, 99.99) so the tail is
//! as visible as the median, latency in milliseconds on a linear axis.

const WIDTH: f64 = 760.0;
const HEIGHT: f64 = 420.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666",
];

/// x position of a percentile: the number of nines.
fn nines(percentile: f64) -> f64 {
    let rest = (100.0 - percentile).max(0.001) / 100.0;
    -rest.log10()
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// `series`: (name, [(percentile, ms)]).
pub fn percentile_plot(title: &str, series: &[(String, Vec<(f64, f64)>)]) -> String {
    let x_max = nines(99.99);
    let y_max = series
        .iter()
        .flat_map(|(_, points)| points.iter())
        .filter(|(p, _)| *p <= 99.99)
        .map(|(_, ms)| *ms)
        .fold(0.0_f64, f64::max)
        .max(0.001)
        * 1.1;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |p: f64| LEFT + nines(p).min(x_max) / x_max * plot_w;
    let y = |ms: f64| TOP + plot_h - (ms / y_max).min(1.0) * plot_h;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{}\" y=\"22\" font-size=\"15\" text-anchor=\"middle\">{}</text>\n",
        LEFT + plot_w / 2.0,
        escape(title)
    );
    // Axes and grid.
    for p in [0.0, 50.0, 90.0, 99.0, 99.9, 99.99] {
        let px = x(p);
        out += &format!(
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">p{p}</text>\n",
            TOP + plot_h,
            TOP + plot_h + 16.0
        );
    }
    for i in 0..=5 {
        let ms = y_max * i as f64 / 5.0;
        let py = y(ms);
        out += &format!(
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#eee\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{ms:.3}</text>\n",
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        );
    }
    out += &format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">percentile</text>\n\
         <text x=\"16\" y=\"{:.1}\" text-anchor=\"middle\" transform=\"rotate(-90 16 {:.1})\">latency (ms)</text>\n",
        LEFT + plot_w / 2.0,
        HEIGHT - 10.0,
        TOP + plot_h / 2.0,
        TOP + plot_h / 2.0
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let path: Vec<String> = points
            .iter()
            .filter(|(p, _)| *p <= 99.99)
            .map(|(p, ms)| format!("{:.1},{:.1}", x(*p), y(*ms)))
            .collect();
        out += &format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        );
        let ly = TOP + 14.0 + i as f64 * 18.0;
        out += &format!(
            "<line x1=\"{:.1}\" y1=\"{ly:.1}\" x2=\"{:.1}\" y2=\"{ly:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/>\n<text x=\"{:.1}\" y=\"{:.1}\">{}</text>\n",
            WIDTH - RIGHT + 12.0,
            WIDTH - RIGHT + 32.0,
            WIDTH - RIGHT + 38.0,
            ly + 4.0,
            escape(name)
        );
    }
    out + "</svg>\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_polyline_per_series_within_the_frame() {
        let svg = percentile_plot(
            "a <title>",
            &[
                (
                    "direct".into(),
                    vec![(50.0, 0.1), (99.0, 0.2), (99.99, 0.5), (100.0, 9.0)],
                ),
                ("weft".into(), vec![(50.0, 0.15), (99.0, 0.3)]),
            ],
        );
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &lt;title&gt;"));
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // The max (p100) is left out, so one outlier cannot flatten the plot.
        assert!(svg.contains(">0.550<"), "the y axis tops at 1.1 x p99.99");
    }
}
