//! The dashboard in a real headless browser (Debian's Chromium): after a real
//! run on PostgreSQL + RabbitMQ with a stock service, the overview shows a
//! confirmed and a cancelled order and the instance page shows its history;
//! screenshots of both are decoded and checked, and kept under the target
//! directory (`target/tmp/dashboard-screenshots/`) for people to look at.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use order_service::config::AdminToken;
use order_service::proto::OrderStatus;

use crate::helpers::spawn_app_with;
use crate::platform::{Platform, START_BACKENDS, Stock, basket};

const TOKEN: &str = "browser-s3cret";

/// The browser window, and so the screenshots' size.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 1600;

/// How long one browser run may take (a cold start on a busy machine is slow).
const BROWSER_PATIENCE: Duration = Duration::from_secs(90);

/// Debian's Chromium, or `CHROMIUM` when set.
fn chromium_binary() -> PathBuf {
    let binary = std::env::var_os("CHROMIUM").map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from);
    assert!(
        binary.exists(),
        "Chromium is not installed at {}: `apt-get install -y chromium` (or set CHROMIUM to a Chromium binary)",
        binary.display()
    );
    binary
}

/// One headless Chromium run at a time, with a profile of its own that is removed afterwards.
struct Browser {
    binary: PathBuf,
    profile: PathBuf,
}

/// Kills a browser's whole process group unless it finished on its own.
struct ProcessGroup(Option<u32>);

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            // Chromium forks helpers into its group; end them all, by group id.
            let _ = std::process::Command::new("kill")
                .args(["-KILL", "--", &format!("-{pid}")])
                .status();
        }
    }
}

impl Browser {
    fn new() -> Self {
        let profile = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chromium-profile-{}", uuid::Uuid::now_v7()));
        Self {
            binary: chromium_binary(),
            profile,
        }
    }

    /// Runs Chromium headless on `url` with `extra` arguments; its standard output.
    async fn run(&self, url: &str, extra: &[String]) -> String {
        let mut command = tokio::process::Command::new(&self.binary);
        command
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--disable-background-networking",
                "--disable-sync",
                "--hide-scrollbars",
                "--mute-audio",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                &format!("--user-data-dir={}", self.profile.display()),
            ])
            .args(extra)
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("Chromium does not start ({e}): `apt-get install -y chromium`"));
        let mut group = ProcessGroup(child.id());
        let output = tokio::time::timeout(BROWSER_PATIENCE, child.wait_with_output())
            .await
            .unwrap_or_else(|_| panic!("Chromium did not finish {url} within {BROWSER_PATIENCE:?}"))
            .expect("Chromium's output is readable");
        if output.status.success() {
            group.0 = None;
        }
        assert!(
            output.status.success(),
            "Chromium failed on {url}: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// The DOM of `url` once loaded and its scripts have run.
    async fn dom(&self, url: &str) -> String {
        self.run(url, &["--dump-dom".to_owned()]).await
    }

    /// A PNG screenshot of `url`, written to `path`.
    async fn screenshot(&self, url: &str, path: &Path) {
        let _ = std::fs::remove_file(path);
        self.run(url, &[format!("--screenshot={}", path.display())]).await;
        assert!(path.exists(), "Chromium wrote no screenshot to {}", path.display());
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.profile);
    }
}

/// Colours of `style.css` that only show when the page shows what it should.
const COMPENSATED_BADGE: [u8; 3] = [0x8a, 0x6d, 0x3b];
/// `--ok`: the completed badges, the chart's completed bars, the card's top line.
const OK: [u8; 3] = [0x1f, 0x9d, 0x55];
/// The fill of the diagram's current node.
const CURRENT_NODE: [u8; 3] = [0xff, 0xe9, 0xa8];

/// Decodes the PNG at `path` and checks it is a rendered page: the window's
/// size, many colours, no colour covering nearly everything, and at least
/// so many pixels of each of `expected` (colour, pixels, what it shows).
fn check_screenshot(path: &Path, expected: &[([u8; 3], u64, &str)]) {
    let file = std::fs::File::open(path).expect("the screenshot opens");
    let mut reader = png::Decoder::new(std::io::BufReader::new(file))
        .read_info()
        .unwrap_or_else(|e| panic!("{} is not a PNG: {e}", path.display()));
    let mut pixels = vec![0; reader.output_buffer_size().expect("a bounded image")];
    let frame = reader.next_frame(&mut pixels).expect("the PNG decodes");
    assert_eq!((frame.width, frame.height), (WIDTH, HEIGHT), "{}", path.display());
    let channels = frame.color_type.samples();
    assert!(channels >= 3, "a colour screenshot, got {:?}", frame.color_type);
    assert_eq!(frame.bit_depth, png::BitDepth::Eight);
    let mut colours: HashMap<[u8; 3], u64> = HashMap::new();
    for pixel in pixels[..frame.buffer_size()].chunks_exact(channels) {
        *colours.entry([pixel[0], pixel[1], pixel[2]]).or_default() += 1;
    }
    let total = u64::from(WIDTH) * u64::from(HEIGHT);
    let commonest = colours.values().copied().max().unwrap_or(0);
    assert!(
        colours.len() >= 64,
        "{} has only {} distinct colours: a blank or unstyled page?",
        path.display(),
        colours.len()
    );
    assert!(
        commonest * 100 < total * 90,
        "{}: one colour covers {}% of the page",
        path.display(),
        commonest * 100 / total
    );
    for (colour, least, what) in expected {
        let seen = colours.get(colour).copied().unwrap_or(0);
        assert!(
            seen >= *least,
            "{}: {what} should paint at least {least} pixels of {colour:02x?}, found {seen}",
            path.display()
        );
    }
}

#[tokio::test]
async fn a_headless_browser_shows_a_confirmed_and_a_cancelled_order_and_a_history() {
    let browser = Browser::new();
    let mut platform = Platform::new().await;
    let mut config = platform.config(Duration::from_secs(60));
    config.admin_token = Some(AdminToken::new(TOKEN));
    let app = spawn_app_with(config).await;
    app.wait_until_serving(START_BACKENDS).await;
    platform.start_stock(Stock::Platform);

    let confirmed = app.place_order("alice", basket("apple")).await.expect("placed");
    let cancelled = app.place_order("bob", basket("unobtainium")).await.expect("placed");
    assert_eq!(
        app.wait_until_decided(&confirmed.id, "alice").await.status(),
        OrderStatus::Confirmed
    );
    assert_eq!(
        app.wait_until_decided(&cancelled.id, "bob").await.status(),
        OrderStatus::Cancelled
    );

    // The browser signs in with ?token=, gets the cookie and is redirected.
    let base = format!("http://{}", app.metrics_addr);
    let home_url = format!("{base}/?token={TOKEN}");
    let dom = browser.dom(&home_url).await;
    assert!(dom.contains("<h1>Sagas</h1>"), "the overview did not load:\n{dom}");
    for (id, status) in [(&confirmed.id, "completed"), (&cancelled.id, "compensated")] {
        let row = format!("<tr data-saga=\"{id}\" data-status=\"{status}\">");
        assert!(dom.contains(&row), "the overview lacks {status} order {id}:\n{dom}");
    }
    assert!(dom.contains("unknown product unobtainium"), "the cancellation reason");
    assert!(dom.contains("data-count=\"completed\">1<") && dom.contains("data-count=\"failed\">1<"));

    let saga_url = format!("{base}/sagas/{}?token={TOKEN}", cancelled.id);
    let dom = browser.dom(&saga_url).await;
    assert!(dom.contains(&cancelled.id), "the instance page did not load:\n{dom}");
    let transitions = dom.matches("<li class=\"transition\"").count();
    assert!(
        transitions >= 2,
        "the history shows {transitions} transition(s):\n{dom}"
    );
    for shown in [
        "OrderCreated",
        "StockUpdateResult",
        "OrderCancelled",
        "unknown product unobtainium",
    ] {
        assert!(dom.contains(shown), "the instance page lacks {shown}:\n{dom}");
    }
    assert!(
        dom.contains("data-node=\"compensated\" aria-current=\"step\""),
        "the diagram highlights where the saga ended:\n{dom}"
    );

    let shots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&shots).expect("the screenshot directory");
    // What the screenshots must show, by colour: on the overview a
    // compensated badge, and completed badges and bars (the completed card's
    // top line alone is under 1,000 pixels); on the instance page the
    // diagram's current node.
    let home: &[([u8; 3], u64, &str)] = &[
        (COMPENSATED_BADGE, 500, "the cancelled order's compensated badge"),
        (OK, 3_000, "the confirmed order's badge and chart bar"),
    ];
    let instance: &[([u8; 3], u64, &str)] = &[
        (CURRENT_NODE, 3_000, "the highlighted current node of the diagram"),
        (COMPENSATED_BADGE, 500, "the compensated badges"),
    ];
    for (name, url, expected) in [("home.png", &home_url, home), ("instance.png", &saga_url, instance)] {
        let path = shots.join(name);
        browser.screenshot(url, &path).await;
        check_screenshot(&path, expected);
        println!("screenshot: {}", path.display());
    }

    app.stop().await.expect("a clean stop");
    platform.clean_up().await;
}
