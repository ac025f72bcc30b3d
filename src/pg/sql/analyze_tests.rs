use super::*;

fn names(shape: &Shape) -> Vec<String> {
    shape
        .relations
        .iter()
        .map(|n| match &n.schema {
            Some(s) => format!("{s}.{}", n.name),
            None => n.name.clone(),
        })
        .collect()
}

fn functions(shape: &Shape) -> Vec<String> {
    shape.functions.iter().map(|n| n.name.clone()).collect()
}

#[track_caller]
fn tables_of(sql: &str) -> Vec<String> {
    names(&analyze(sql).unwrap_or_else(|| panic!("not analysed: {sql}")))
}

#[track_caller]
fn refused(sql: &str) {
    assert_eq!(analyze(sql), None, "analysed: {sql}");
}

#[test]
fn joins_subqueries_and_ctes_name_their_tables() {
    assert_eq!(
        tables_of("SELECT a.x, b.y FROM a JOIN b ON a.id = b.a_id WHERE b.y > $1"),
        ["a", "b"]
    );
    assert_eq!(
        tables_of("SELECT * FROM a, b LEFT JOIN c USING (id) CROSS JOIN d"),
        ["a", "b", "c", "d"]
    );
    assert_eq!(
        tables_of("SELECT x FROM a WHERE id IN (SELECT a_id FROM b) AND EXISTS (SELECT 1 FROM c)"),
        ["a", "b", "c"]
    );
    assert_eq!(
        tables_of("SELECT (SELECT max(y) FROM b) FROM (SELECT * FROM a) AS s"),
        ["a", "b"]
    );
    assert_eq!(
        tables_of("SELECT x FROM a UNION ALL SELECT x FROM b EXCEPT SELECT x FROM c"),
        ["a", "b", "c"]
    );
    // CTE names are not tables; their bodies' tables are.
    assert_eq!(
        tables_of(
            "WITH recent AS (SELECT * FROM orders), r2 AS (SELECT user_id FROM recent) SELECT * FROM r2 JOIN users u ON u.id = r2.user_id"
        ),
        ["orders", "users"]
    );
    // A qualified name of a `SELECT *` CTE: its columns are not known from
    // the text (it could be a function taking a record), not analysed.
    refused("WITH r2 AS (SELECT * FROM orders) SELECT * FROM r2 JOIN users u ON u.id = r2.user_id");
    assert_eq!(
        tables_of(
            "WITH RECURSIVE t(n) AS (SELECT id FROM nodes UNION SELECT n + 1 FROM t WHERE n < 5) SELECT * FROM t"
        ),
        ["nodes"]
    );
    // A CTE's name is not in scope in its own (non-recursive) body: there
    // it is the table.
    assert_eq!(
        tables_of("WITH a AS (SELECT * FROM a) SELECT * FROM a"),
        ["a"]
    );
    // A schema-qualified name is never a CTE.
    assert_eq!(
        tables_of("WITH a AS (SELECT 1) SELECT * FROM a, public.a"),
        ["public.a"]
    );
    assert_eq!(
        tables_of(
            "SELECT * FROM (a JOIN b ON a.id = b.id) JOIN LATERAL (SELECT * FROM c WHERE c.id = a.id) l ON true"
        ),
        ["a", "b", "c"]
    );
}

#[test]
fn names_fold_like_postgresql() {
    assert_eq!(tables_of("SELECT * FROM Users"), ["users"]);
    assert_eq!(tables_of("SELECT * FROM \"Users\""), ["Users"]);
    assert_eq!(
        tables_of("SELECT * FROM App.\"My Table\""),
        ["app.My Table"]
    );
    assert_eq!(tables_of("SELECT * FROM \"we\"\"ird\""), ["we\"ird"]);
    let shape = analyze("SELECT * FROM \"we\"\"ird\", app.t").unwrap();
    let quoted: Vec<String> = shape.relations.iter().map(Name::quoted).collect();
    assert_eq!(quoted, ["\"we\"\"ird\"", "\"app\".\"t\""]);
    refused("SELECT * FROM db.app.t");
}

#[test]
fn functions_and_operators_are_collected() {
    let shape = analyze(
        "SELECT lower(name), count(*), coalesce(x, 0), pg_catalog.upper(y) FROM t \
         WHERE a LIKE $1 AND b BETWEEN 1 AND 2 AND c = ANY($2) GROUP BY 1 HAVING sum(z) > 3",
    )
    .unwrap();
    assert_eq!(functions(&shape), ["count", "lower", "sum", "upper"]);
    assert!(
        shape
            .functions
            .iter()
            .any(|f| f.schema.as_deref() == Some("pg_catalog"))
    );
    for op in ["~~", ">=", "<=", "=", ">"] {
        assert!(shape.operators.contains(op), "{op}: {:?}", shape.operators);
    }
    let shape = analyze("SELECT id, random() FROM t").unwrap();
    assert_eq!(functions(&shape), ["random"]);
    let shape = analyze("SELECT row_number() OVER (PARTITION BY a ORDER BY b) FROM t").unwrap();
    assert_eq!(functions(&shape), ["row_number"]);
    let shape = analyze("SELECT CURRENT_TIMESTAMP, now() FROM t").unwrap();
    assert!(functions(&shape).contains(&"now".to_owned()), "{shape:?}");
    assert!(shape.functions.len() == 2, "{shape:?}");
    // Constructors with function syntax are not functions.
    let shape = analyze("SELECT ROW(1, a), ARRAY(SELECT 1), COALESCE(a, 1) FROM t").unwrap();
    assert!(shape.functions.is_empty(), "{shape:?}");
    // Clock readers are functions by these names: the catalog refuses them.
    let shape = analyze(
        "SELECT CURRENT_TIMESTAMP, CURRENT_DATE, current_user, LOCALTIMESTAMP(2), USER FROM t",
    )
    .unwrap();
    assert_eq!(
        functions(&shape),
        [
            "current_date",
            "current_timestamp",
            "current_user",
            "localtimestamp",
            "user"
        ]
    );
    // Quoted, they are columns.
    assert!(analyze("SELECT \"current_role\" FROM t").is_some());
    let shape = analyze("SELECT * FROM t WHERE x OPERATOR(pg_catalog.+) 1 > 2").unwrap();
    assert!(shape.operators.contains("+"));
}

#[test]
fn anything_but_a_plain_select_is_refused() {
    let mut wrongly = Vec::new();
    for sql in [
        "",
        "this is not sql",
        "SELECT 1; SELECT 2",
        "UPDATE t SET a = 1",
        "INSERT INTO t VALUES (1)",
        "DELETE FROM t",
        "SELECT * FROM t FOR UPDATE",
        "SELECT * FROM t FOR SHARE",
        "SELECT * INTO copy FROM t",
        "WITH moved AS (DELETE FROM t RETURNING *) SELECT * FROM moved",
        "WITH x AS (UPDATE t SET a = 1 RETURNING *) SELECT * FROM x",
        "SELECT * FROM generate_series(1, 10)",
        "SELECT * FROM t, LATERAL generate_series(1, t.n)",
        "SELECT * FROM unnest($1::int[])",
        "SELECT * FROM t TABLESAMPLE SYSTEM (10)",
        "SELECT * FROM t WHERE created > 'now'::timestamptz",
        "SELECT * FROM t WHERE day = DATE 'today'",
        "SELECT * FROM t WHERE day = CAST(' Tomorrow ' AS date)",
        "SELECT * FROM t WHERE day = $1::text::date",
        "EXPLAIN SELECT * FROM t",
        "SHOW search_path",
        "SELECT * FROM t WHERE a RLIKE 'x'",
        "TABLE t",
        // PostgreSQL 14's `GROUP BY DISTINCT`: sqlparser does not know it.
        "SELECT v FROM t GROUP BY DISTINCT v",
        "SELECT * FROM ROWS FROM (generate_series(1, 2))",
        "SELECT v FROM t ORDER BY v USING <",
        // Keywords sqlparser reads as column names: the session's state.
        "SELECT CURRENT_ROLE FROM t",
        "SELECT * FROM t WHERE s = current_schema",
    ] {
        if analyze(sql).is_some() {
            wrongly.push(sql);
        }
    }
    assert!(wrongly.is_empty(), "analysed: {wrongly:#?}");
    // Dates that are not the clock are fine.
    assert_eq!(
        tables_of("SELECT * FROM t WHERE day > '2024-01-01'::date AND ts::date = $1"),
        ["t"]
    );
}

#[test]
fn hostile_statements_do_not_overflow() {
    // Nesting past sqlparser's recursion limit: a parse error.
    let deep = format!("SELECT {}1{} FROM t", "(".repeat(5_000), ")".repeat(5_000));
    refused(&deep);
    let subqueries = format!(
        "SELECT * FROM t WHERE id IN {}",
        "(SELECT id FROM t WHERE id IN ".repeat(2_000)
    );
    refused(&subqueries);
    // A left-deep chain is parsed without recursion: the walk's own limit.
    let chain = format!("SELECT 1{} FROM t", " + 1".repeat(50_000));
    refused(&chain);
    let ors = format!(
        "SELECT * FROM t WHERE {}",
        vec!["id = 1"; 20_000].join(" OR ")
    );
    refused(&ors);
    // Within the limits, long is fine.
    let some_ors = format!("SELECT * FROM t WHERE {}", vec!["id = 1"; 100].join(" OR "));
    assert_eq!(tables_of(&some_ors), ["t"]);
    // Too long to analyse at all.
    refused(&format!(
        "SELECT * FROM t WHERE a IN ({})",
        vec!["1"; 200_000].join(",")
    ));
    // Garbage.
    refused("SELECT \u{0}");
    refused("SELECT '");
    refused("SELECT * FROM \"unterminated");
}

#[test]
fn a_single_table_where_conjunction_is_a_lookup() {
    let lookup = |sql: &str| analyze(sql).unwrap_or_else(|| panic!("{sql}")).lookup;
    assert_eq!(
        lookup("SELECT name FROM users WHERE id = $1"),
        Some(vec![("id".into(), KeyValue::Param(1))])
    );
    assert_eq!(
        lookup("SELECT * FROM app.docs d WHERE (d.owner = 'a,b') AND 7 = d.ID AND d.x > 3"),
        Some(vec![
            ("id".into(), KeyValue::Number("7".into())),
            ("owner".into(), KeyValue::Text("a,b".into())),
        ])
    );
    assert_eq!(
        lookup("SELECT * FROM docs WHERE docs.id = $2 AND public.docs.k = TRUE"),
        Some(vec![("id".into(), KeyValue::Param(2)),])
    );
    // Another alias's column (no such alias: not analysed at all), an OR,
    // a cast: no term.
    refused("SELECT * FROM docs d WHERE x.id = $1");
    assert_eq!(
        lookup("SELECT * FROM docs WHERE id = $1 OR id = $2"),
        Some(vec![])
    );
    assert_eq!(
        lookup("SELECT * FROM docs WHERE id = $1::int8"),
        Some(vec![])
    );
    // Not a single table: no lookup.
    assert_eq!(lookup("SELECT * FROM docs"), None);
    assert_eq!(
        lookup("SELECT * FROM a JOIN b ON a.id = b.id WHERE a.id = $1"),
        None
    );
    assert_eq!(lookup("SELECT * FROM a, b WHERE a.id = $1"), None);
    assert_eq!(
        lookup("SELECT * FROM a WHERE id = $1 AND name = (SELECT max(name) FROM a)"),
        None
    );
    assert_eq!(
        lookup("WITH c AS (SELECT 1) SELECT * FROM a WHERE id = $1"),
        None
    );
    assert_eq!(
        lookup("SELECT * FROM a WHERE id = $1 UNION SELECT * FROM a WHERE id = $2"),
        None
    );
    assert_eq!(
        lookup("SELECT * FROM a JOIN a b ON true WHERE a.id = $1"),
        None
    );
}

#[test]
fn a_column_alias_list_is_no_lookup() {
    let shape = |sql: &str| analyze(sql).unwrap_or_else(|| panic!("{sql}"));
    // `id` here is the table's second column, renamed.
    assert_eq!(
        shape("SELECT * FROM users u(uid, id) WHERE id = $1").lookup,
        None
    );
    assert_eq!(
        shape("SELECT * FROM users u(uid) WHERE u.uid = $1").lookup,
        None
    );
    // Without a column list, still one.
    assert!(
        shape("SELECT * FROM users u WHERE u.id = $1")
            .lookup
            .is_some()
    );
}

/// `(relation, column)` pairs the catalog is asked to confirm.
#[track_caller]
fn columns_of(sql: &str) -> Vec<String> {
    analyze(sql)
        .unwrap_or_else(|| panic!("not analysed: {sql}"))
        .columns
        .iter()
        .map(|(r, c)| format!("{}.{c}", r.quoted()))
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

#[test]
fn qualified_references_are_columns_to_confirm_or_refused() {
    // `u.order_count` is `order_count(u)` if users has no such column.
    assert_eq!(
        columns_of("SELECT u.order_count FROM users u WHERE u.id = $1"),
        ["\"users\".id", "\"users\".order_count"]
    );
    assert_eq!(
        columns_of("SELECT (u).order_count FROM users u"),
        ["\"users\".order_count"]
    );
    assert_eq!(
        columns_of("SELECT users.n, app.docs.m, public.t.k FROM users, app.docs, t"),
        ["\"app\".\"docs\".m", "\"t\".k", "\"users\".n"]
    );
    // In every clause, subqueries included; a name bound twice is checked
    // against both.
    assert_eq!(
        columns_of("SELECT a.x FROM a WHERE a.y IN (SELECT a.z FROM b a) ORDER BY a.w"),
        [
            "\"a\".w", "\"a\".x", "\"a\".y", "\"a\".z", "\"b\".w", "\"b\".x", "\"b\".y", "\"b\".z"
        ]
    );
    // Unqualified names are never function calls.
    assert_eq!(
        columns_of("SELECT order_count FROM users u"),
        [] as [&str; 0]
    );
    // A subquery's or CTE's columns: the names its text spells out.
    assert_eq!(
        columns_of("SELECT s.n, s.m FROM (SELECT id AS n, t.m FROM t) s"),
        ["\"t\".m"]
    );
    assert_eq!(
        columns_of("WITH c(a) AS (SELECT x, y FROM t) SELECT c.a, c.y, d.b FROM c, c d(b)"),
        [] as [&str; 0]
    );
    assert_eq!(columns_of("SELECT u.a FROM users u(a, b)"), [] as [&str; 0]);
    for sql in [
        // A name the subquery's text does not show may be `f(record)`.
        "SELECT s.rec_count FROM (SELECT * FROM users) s",
        "SELECT s.rec_count FROM (SELECT id FROM users) s",
        "WITH c AS (SELECT * FROM users) SELECT c.rec_count FROM c",
        "SELECT u.name FROM users u(a, b)",
        // A join's alias, a field of a column, of a function's result.
        "SELECT j.f FROM (users u JOIN orders o ON o.user_id = u.id) j",
        "SELECT (u.name).length FROM users u",
        "SELECT u.name.length FROM users u",
        "SELECT (lower(u.name)).f FROM users u",
        "SELECT u.tags[1].f FROM users u",
        // A qualifier bound nowhere (or hidden by an alias).
        "SELECT x.id FROM users u",
        "SELECT users.id FROM users u",
        "SELECT a.b.c.d FROM a",
    ] {
        refused(sql);
    }
    // Subscripts are fine.
    assert_eq!(
        columns_of("SELECT u.tags[1], (u.tags)[2:3] FROM users u"),
        ["\"users\".tags"]
    );
}

#[test]
fn literals_that_read_the_clock_are_refused_as_words() {
    for lit in [
        "now",
        " NOW ",
        "today 08:00",
        "yesterday UTC",
        "tomorrow allballs",
        "2024-01-01 today",
        "Today",
    ] {
        refused(&format!("SELECT * FROM t WHERE d > '{lit}'"));
        refused(&format!("SELECT * FROM t WHERE d > '{lit}'::timestamptz"));
    }
    for lit in [
        "epoch",
        "infinity",
        "-infinity",
        "allballs",
        "nowhere",
        "2024-01-01 08:00",
    ] {
        tables_of(&format!("SELECT * FROM t WHERE d > '{lit}'::timestamptz"));
    }
}
