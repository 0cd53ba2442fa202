//! The benchmark's webhook-shaped rows (issue 22): what the report says of
//! them holds, on a database of the shared cluster (no REST server).

use stack::Cluster;

const PORTALS: i64 = 1000;

/// 20,000 webhook-shaped rows, inserted in two pieces as the benchmark
/// does past 5M rows, in a fresh database.
fn webhook_database(cluster: &Cluster) -> postgres::Client {
    let db = cluster.create_database();
    let mut c = postgres::Client::connect(&cluster.url(&db), postgres::NoTls).unwrap();
    for (offset, n) in [(0, 12_000), (12_000, 8_000)] {
        stack::insert_webhook_rows(&mut c, offset, n, 20_000, PORTALS, "2025-07", "2025-06");
    }
    c
}

fn one(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn webhook_rows_are_in_time_order_zipf_like_with_a_trickle_of_late_rows_and_deterministic() {
    let cluster = Cluster::shared();
    let mut c = webhook_database(cluster);
    assert_eq!(one(&mut c, "SELECT count(*) FROM usage_requests"), 20_000);
    // Valid as the uniform rows are: every key one a row may count toward,
    // a finite time in its month, 5% errors with a message.
    assert_eq!(
        one(
            &mut c,
            "SELECT count(*) FROM usage_requests
              WHERE NOT (portal_id BETWEEN 1000 AND 1999 AND month_year ~ '^[0-9]{4}-(0[1-9]|1[0-2])$'
                         AND to_char(request_timestamp, 'YYYY-MM') = month_year
                         AND source_date IS NOT NULL AND source_format IS NOT NULL AND target_format IS NOT NULL
                         AND (success = (error_message IS NULL)))"
        ),
        0
    );
    assert_eq!(
        one(
            &mut c,
            "SELECT count(*) FROM usage_requests WHERE NOT success"
        ),
        1000
    );
    // The current month's rows: request_timestamp rises with the id.
    assert_eq!(
        one(
            &mut c,
            "SELECT count(*) FROM (SELECT request_timestamp <= lag(request_timestamp) OVER (ORDER BY id) AS back
                                     FROM usage_requests WHERE month_year = '2025-07') x WHERE back"
        ),
        0
    );
    // A trickle of late rows for the previous month, spread over the ids.
    let late = one(
        &mut c,
        "SELECT count(*) FROM usage_requests WHERE month_year = '2025-06'",
    );
    assert!((200..=600).contains(&late), "{late} late rows of 20000");
    assert!(
        one(
            &mut c,
            "SELECT count(*) FROM usage_requests WHERE month_year = '2025-06' AND id > 15000"
        ) > 0
    );
    // Zipf-like: rank 1 (portal 1000) is the busiest, and the busiest 1% of
    // portals make about half the rows (s = 1.1 over 1000 portals: 10% and
    // 50% in theory).
    assert_eq!(
        one(
            &mut c,
            "SELECT portal_id FROM usage_requests GROUP BY 1 ORDER BY count(*) DESC LIMIT 1"
        ),
        1000
    );
    let top = one(
        &mut c,
        "SELECT sum(n)::bigint FROM (SELECT count(*) AS n FROM usage_requests GROUP BY portal_id
                                     ORDER BY n DESC LIMIT 10) t",
    );
    assert!(
        (7_000..=13_000).contains(&top),
        "the busiest 10 portals: {top} rows"
    );
    // The same calls give the same rows.
    let digest = "SELECT md5(string_agg(concat_ws(',', id, portal_id, month_year, request_timestamp, success), ';' ORDER BY id))";
    let rows = format!("{digest} FROM usage_requests");
    let a: String = c.query_one(&rows, &[]).unwrap().get(0);
    let b: String = webhook_database(cluster)
        .query_one(&rows, &[])
        .unwrap()
        .get(0);
    assert_eq!(a, b, "the webhook-shaped rows are not deterministic");
}
