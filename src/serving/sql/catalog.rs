//! The catalog clients browse: every view as a table of a schema named after its pipeline.
//!
//! Two ways in:
//! - Tables queried like any other (by polars): `information_schema.tables`, `.columns`,
//!   `.schemata`, and `pg_catalog.pg_namespace`, `pg_class`, `pg_attribute`, `pg_type`,
//!   `pg_database`, `pg_tables` with the columns clients read.
//! - The queries of psql's `\dt` and `\d` and of Grafana's table and column pickers, which
//!   use PostgreSQL internals polars does not have (regex operators on `name`, correlated
//!   subqueries, `quote_ident`, `parse_ident`): recognized by their text and answered here.

use std::collections::BTreeMap;

use pgwire::api::Type;
use polars::prelude::*;

use super::statement::Names;
use super::types::type_name;

/// OID of the `pg_catalog` namespace.
const PG_CATALOG_OID: i64 = 11;
/// The first OID given to a pipeline's schema; its tables count from [`FIRST_TABLE_OID`].
const FIRST_SCHEMA_OID: i64 = 16_400;
const FIRST_TABLE_OID: i64 = 17_000;

/// One view as a table.
#[derive(Debug, Clone)]
pub struct Table {
    pub schema: String,
    pub name: String,
    /// Index of the view in its pipeline.
    pub view: usize,
    pub oid: i64,
    pub columns: Columns,
}

#[derive(Debug, Clone)]
pub struct Catalog {
    pub tables: Vec<Table>,
    /// The user name reported as the tables' owner.
    owner: String,
    frames: BTreeMap<&'static str, DataFrame>,
}

/// The catalog tables lambda-ctl has, by qualified name.
pub const TABLES: &[&str] = &[
    "information_schema.tables",
    "information_schema.columns",
    "information_schema.schemata",
    "pg_catalog.pg_namespace",
    "pg_catalog.pg_class",
    "pg_catalog.pg_attribute",
    "pg_catalog.pg_type",
    "pg_catalog.pg_database",
    "pg_catalog.pg_tables",
];

/// Built-in types clients look up by OID or name: (oid, name, length, category).
const TYPES: &[(u32, &str, i64, &str)] = &[
    (16, "bool", 1, "B"),
    (17, "bytea", -1, "U"),
    (18, "char", 1, "S"),
    (19, "name", 64, "S"),
    (20, "int8", 8, "N"),
    (21, "int2", 2, "N"),
    (23, "int4", 4, "N"),
    (25, "text", -1, "S"),
    (26, "oid", 4, "N"),
    (114, "json", -1, "U"),
    (700, "float4", 4, "N"),
    (701, "float8", 8, "N"),
    (705, "unknown", -2, "X"),
    (1042, "bpchar", -1, "S"),
    (1043, "varchar", -1, "S"),
    (1082, "date", 4, "D"),
    (1083, "time", 8, "D"),
    (1114, "timestamp", 8, "D"),
    (1184, "timestamptz", 8, "D"),
    (1186, "interval", 16, "T"),
    (1700, "numeric", -1, "N"),
    (2950, "uuid", 16, "U"),
    (3802, "jsonb", -1, "U"),
];

/// A table's columns: name and type.
pub type Columns = Vec<(String, Type)>;

impl Catalog {
    /// `views`: per pipeline (in name order), its views' names and columns.
    pub fn new(views: Vec<(String, Vec<(String, Columns)>)>, owner: &str) -> Catalog {
        let mut tables = Vec::new();
        for (pipeline, list) in views {
            for (i, (name, columns)) in list.into_iter().enumerate() {
                let oid = FIRST_TABLE_OID + tables.len() as i64;
                tables.push(Table {
                    schema: pipeline.clone(),
                    name,
                    view: i,
                    oid,
                    columns,
                });
            }
        }
        let mut catalog = Catalog {
            tables,
            owner: owner.to_string(),
            frames: BTreeMap::new(),
        };
        catalog.frames = catalog.build();
        catalog
    }

    /// The schemas (pipelines) in order, with their OIDs.
    fn schemas(&self) -> Vec<(String, i64)> {
        let mut out: Vec<(String, i64)> = Vec::new();
        for t in &self.tables {
            if !out.iter().any(|(s, _)| s == &t.schema) {
                let oid = FIRST_SCHEMA_OID + out.len() as i64;
                out.push((t.schema.clone(), oid));
            }
        }
        out
    }

    fn schema_oid(&self, schema: &str) -> i64 {
        self.schemas()
            .into_iter()
            .find(|(s, _)| s == schema)
            .map_or(0, |(_, o)| o)
    }

    /// A catalog table's rows.
    pub fn frame(&self, name: &str) -> Option<DataFrame> {
        self.frames.get(name).cloned()
    }

    fn build(&self) -> BTreeMap<&'static str, DataFrame> {
        let mut frames = BTreeMap::new();
        let db = "lambda";
        let t = &self.tables;
        let col = |rows: &[&Table], f: &dyn Fn(&Table) -> String| -> Vec<String> {
            rows.iter().map(|t| f(t)).collect()
        };
        let all: Vec<&Table> = t.iter().collect();
        frames.insert(
            "information_schema.tables",
            frame(vec![
                strs("table_catalog", col(&all, &|_| db.into())),
                strs("table_schema", col(&all, &|t| t.schema.clone())),
                strs("table_name", col(&all, &|t| t.name.clone())),
                strs("table_type", col(&all, &|_| "BASE TABLE".into())),
                strs("is_insertable_into", col(&all, &|_| "NO".into())),
            ]),
        );
        let cols: Vec<(&Table, usize)> = t
            .iter()
            .flat_map(|t| (0..t.columns.len()).map(move |i| (t, i)))
            .collect();
        let ccol = |f: &dyn Fn(&Table, usize) -> String| -> Vec<String> {
            cols.iter().map(|(t, i)| f(t, *i)).collect()
        };
        frames.insert(
            "information_schema.columns",
            frame(vec![
                strs("table_catalog", ccol(&|_, _| db.into())),
                strs("table_schema", ccol(&|t, _| t.schema.clone())),
                strs("table_name", ccol(&|t, _| t.name.clone())),
                strs("column_name", ccol(&|t, i| t.columns[i].0.clone())),
                ints(
                    "ordinal_position",
                    cols.iter().map(|(_, i)| *i as i64 + 1).collect(),
                ),
                Column::new("column_default".into(), vec![None::<String>; cols.len()]),
                strs("is_nullable", ccol(&|_, _| "YES".into())),
                strs("data_type", ccol(&|t, i| type_name(&t.columns[i].1).into())),
                strs("udt_name", ccol(&|t, i| t.columns[i].1.name().into())),
            ]),
        );
        let schemas = self.schemas();
        let mut namespaces: Vec<(String, i64)> = vec![
            ("pg_catalog".into(), PG_CATALOG_OID),
            ("public".into(), 2200),
            ("information_schema".into(), 13_000),
        ];
        namespaces.extend(schemas.iter().cloned());
        frames.insert(
            "information_schema.schemata",
            frame(vec![
                strs(
                    "catalog_name",
                    namespaces.iter().map(|_| db.into()).collect(),
                ),
                strs(
                    "schema_name",
                    namespaces.iter().map(|(s, _)| s.clone()).collect(),
                ),
                strs(
                    "schema_owner",
                    namespaces.iter().map(|_| self.owner.clone()).collect(),
                ),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_namespace",
            frame(vec![
                ints("oid", namespaces.iter().map(|(_, o)| *o).collect()),
                strs(
                    "nspname",
                    namespaces.iter().map(|(s, _)| s.clone()).collect(),
                ),
                ints("nspowner", namespaces.iter().map(|_| 10).collect()),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_class",
            frame(vec![
                ints("oid", t.iter().map(|t| t.oid).collect()),
                strs("relname", col(&all, &|t| t.name.clone())),
                ints(
                    "relnamespace",
                    t.iter().map(|t| self.schema_oid(&t.schema)).collect(),
                ),
                strs("relkind", col(&all, &|_| "r".into())),
                ints("relowner", t.iter().map(|_| 10).collect()),
                ints(
                    "relnatts",
                    t.iter().map(|t| t.columns.len() as i64).collect(),
                ),
                bools("relhasindex", t.iter().map(|_| false).collect()),
                strs("relpersistence", col(&all, &|_| "p".into())),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_attribute",
            frame(vec![
                ints("attrelid", cols.iter().map(|(t, _)| t.oid).collect()),
                strs("attname", ccol(&|t, i| t.columns[i].0.clone())),
                ints(
                    "atttypid",
                    cols.iter()
                        .map(|(t, i)| i64::from(t.columns[*i].1.oid()))
                        .collect(),
                ),
                ints("attnum", cols.iter().map(|(_, i)| *i as i64 + 1).collect()),
                ints("atttypmod", cols.iter().map(|_| -1).collect()),
                bools("attnotnull", cols.iter().map(|_| false).collect()),
                bools("attisdropped", cols.iter().map(|_| false).collect()),
                bools("atthasdef", cols.iter().map(|_| false).collect()),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_type",
            frame(vec![
                ints("oid", TYPES.iter().map(|t| i64::from(t.0)).collect()),
                strs("typname", TYPES.iter().map(|t| t.1.to_string()).collect()),
                ints(
                    "typnamespace",
                    TYPES.iter().map(|_| PG_CATALOG_OID).collect(),
                ),
                ints("typlen", TYPES.iter().map(|t| t.2).collect()),
                strs("typtype", TYPES.iter().map(|_| "b".to_string()).collect()),
                strs(
                    "typcategory",
                    TYPES.iter().map(|t| t.3.to_string()).collect(),
                ),
                ints("typbasetype", TYPES.iter().map(|_| 0).collect()),
                ints("typelem", TYPES.iter().map(|_| 0).collect()),
                ints("typrelid", TYPES.iter().map(|_| 0).collect()),
                bools("typnotnull", TYPES.iter().map(|_| false).collect()),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_database",
            frame(vec![
                ints("oid", vec![16_384]),
                strs("datname", vec![db.to_string()]),
            ]),
        );
        frames.insert(
            "pg_catalog.pg_tables",
            frame(vec![
                strs("schemaname", col(&all, &|t| t.schema.clone())),
                strs("tablename", col(&all, &|t| t.name.clone())),
                strs("tableowner", col(&all, &|_| self.owner.clone())),
                bools("hasindexes", t.iter().map(|_| false).collect()),
            ]),
        );
        frames
    }

    /// The answer to a query of psql's `\dt` / `\d` or Grafana's pickers, when `sql` is one.
    pub fn recognize(&self, sql: &str) -> Option<DataFrame> {
        let text = sql.split_whitespace().collect::<Vec<_>>().join(" ");
        let has = |s: &str| text.contains(s);
        if has("FROM pg_catalog.pg_class c") && has("pg_catalog.pg_get_userbyid(c.relowner)") {
            return Some(self.psql_list(&text));
        }
        if text.starts_with("SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c") {
            return Some(self.psql_lookup(&text));
        }
        if has("c.relchecks, c.relkind") && has("WHERE c.oid = '") {
            return Some(self.psql_details(&text));
        }
        if has("FROM pg_catalog.pg_attribute a") && has("a.attrelid = '") {
            return Some(self.psql_columns(&text));
        }
        if has("information_schema.tables") && has("quote_ident(table_name)") {
            let names: Vec<String> = self
                .tables
                .iter()
                .map(|t| format!("{}.{}", quote_ident(&t.schema), quote_ident(&t.name)))
                .collect();
            return Some(frame(vec![strs("table", names)]));
        }
        if has("information_schema.columns") && has("parse_ident('") {
            let target = between(&text, "parse_ident('", "'").unwrap_or_default();
            let (schema, table) = match target.split_once('.') {
                Some((s, t)) => (Some(unquote(s)), unquote(t)),
                None => (None, unquote(&target)),
            };
            let rows: Vec<&(String, Type)> = self
                .tables
                .iter()
                .filter(|t| t.name == table && schema.as_ref().is_none_or(|s| &t.schema == s))
                .take(1)
                .flat_map(|t| t.columns.iter())
                .collect();
            return Some(frame(vec![
                strs("column", rows.iter().map(|(c, _)| quote_ident(c)).collect()),
                strs(
                    "type",
                    rows.iter().map(|(_, t)| type_name(t).to_string()).collect(),
                ),
            ]));
        }
        // A query reading a catalog table lambda-ctl does not have (psql's `\d` asks for
        // policies, statistics, publications, inheritance): there are none.
        let unmodelled = ["FROM pg_catalog.", "JOIN pg_catalog.", ", pg_catalog."]
            .iter()
            .flat_map(|prefix| text.match_indices(prefix).map(|(i, p)| i + p.len()))
            .map(|at| {
                text[at..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .any(|name| {
                name.starts_with("pg_") && !TABLES.contains(&format!("pg_catalog.{name}").as_str())
            });
        if unmodelled {
            let columns = select_items(&text)
                .iter()
                .map(|item| Column::new(item_name(item).as_str().into(), Vec::<String>::new()))
                .collect();
            return Some(frame(columns));
        }
        None
    }

    /// The tables whose schema and name match psql's patterns in `text`.
    fn matching(&self, text: &str) -> Vec<&Table> {
        let schema = between(text, "n.nspname OPERATOR(pg_catalog.~) '", "'");
        let name = between(text, "c.relname OPERATOR(pg_catalog.~) '", "'");
        let mut found: Vec<&Table> = self
            .tables
            .iter()
            .filter(|t| schema.as_deref().is_none_or(|p| psql_match(p, &t.schema)))
            .filter(|t| name.as_deref().is_none_or(|p| psql_match(p, &t.name)))
            .collect();
        // psql orders by schema, then name.
        found.sort_by(|a, b| (&a.schema, &a.name).cmp(&(&b.schema, &b.name)));
        found
    }

    /// `\dt [PATTERN]`: Schema, Name, Type, Owner (and `\dt+`'s further columns).
    fn psql_list(&self, text: &str) -> DataFrame {
        let kinds = between(text, "c.relkind IN (", ")").unwrap_or_default();
        let rows: Vec<&Table> = if kinds.contains("'r'") {
            self.matching(text)
        } else {
            Vec::new()
        };
        let columns = select_items(text)
            .iter()
            .map(|item| {
                let name = item_name(item);
                let values: Vec<Option<String>> = rows
                    .iter()
                    .map(|t| match name.as_str() {
                        "Schema" => Some(t.schema.clone()),
                        "Name" => Some(t.name.clone()),
                        "Type" => Some("table".into()),
                        "Owner" => Some(self.owner.clone()),
                        "Persistence" => Some("permanent".into()),
                        "Access method" => Some("heap".into()),
                        "Size" => Some("0 bytes".into()),
                        _ => None,
                    })
                    .collect();
                Column::new(name.as_str().into(), values)
            })
            .collect();
        frame(columns)
    }

    /// `\d PATTERN`, first query: the matching tables' oid, schema and name.
    fn psql_lookup(&self, text: &str) -> DataFrame {
        let rows = self.matching(text);
        frame(vec![
            strs("oid", rows.iter().map(|t| t.oid.to_string()).collect()),
            strs("nspname", rows.iter().map(|t| t.schema.clone()).collect()),
            strs("relname", rows.iter().map(|t| t.name.clone()).collect()),
        ])
    }

    fn table_by_oid(&self, text: &str, prefix: &str) -> Option<&Table> {
        let oid = between(text, prefix, "'")?.parse::<i64>().ok()?;
        self.tables.iter().find(|t| t.oid == oid)
    }

    /// `\d`, second query: the table's kind and flags.
    fn psql_details(&self, text: &str) -> DataFrame {
        let found = self.table_by_oid(text, "WHERE c.oid = '").is_some();
        let columns = select_items(text)
            .iter()
            .map(|item| {
                let value = match item.as_str() {
                    "c.relchecks" | "c.reltablespace" => Some("0"),
                    "c.relkind" => Some("r"),
                    "c.relpersistence" => Some("p"),
                    "c.relreplident" => Some("d"),
                    "am.amname" => Some("heap"),
                    "''" => Some(""),
                    s if s.starts_with("CASE WHEN c.reloftype") => Some(""),
                    s if s.starts_with("c.rel") || s.starts_with("false") => Some("f"),
                    _ => None,
                };
                let values: Vec<Option<String>> = if found {
                    vec![value.map(str::to_string)]
                } else {
                    Vec::new()
                };
                Column::new(item_name(item).as_str().into(), values)
            })
            .collect();
        frame(columns)
    }

    /// `\d`, third query: the table's columns.
    fn psql_columns(&self, text: &str) -> DataFrame {
        let cols: Vec<&(String, Type)> = self
            .table_by_oid(text, "a.attrelid = '")
            .map(|t| t.columns.iter().collect())
            .unwrap_or_default();
        let columns = select_items(text)
            .iter()
            .map(|item| {
                let values: Vec<Option<String>> = cols
                    .iter()
                    .map(|(name, ty)| match item.as_str() {
                        "a.attname" => Some(name.clone()),
                        s if s.starts_with("pg_catalog.format_type(") => {
                            Some(type_name(ty).to_string())
                        }
                        "a.attnotnull" => Some("f".into()),
                        "a.attidentity" | "a.attgenerated" | "a.attcompression" => {
                            Some(String::new())
                        }
                        "a.attstorage" => Some(if *ty == Type::TEXT { "x" } else { "p" }.into()),
                        _ => None,
                    })
                    .collect();
                Column::new(item_name(item).as_str().into(), values)
            })
            .collect();
        frame(columns)
    }
}

impl Names for Catalog {
    fn view(&self, schema: Option<&str>, table: &str) -> Option<(String, usize, String)> {
        let mut found = self
            .tables
            .iter()
            .filter(|t| t.name == table && schema.is_none_or(|s| s == t.schema));
        let first = found.next()?;
        if schema.is_none() && found.next().is_some() {
            // The same view name in two pipelines: it needs its schema.
            return None;
        }
        Some((first.schema.clone(), first.view, first.name.clone()))
    }

    fn catalog(&self, schema: Option<&str>, table: &str) -> Option<&'static str> {
        let qualified = match schema {
            Some(s) => format!("{s}.{table}"),
            None => format!("pg_catalog.{table}"),
        };
        TABLES.iter().copied().find(|t| *t == qualified)
    }
}

/// A frame of `columns` (of one length); a repeated name gets a suffix (`?column?_2`).
fn frame(columns: Vec<Column>) -> DataFrame {
    let height = columns.first().map_or(0, Column::len);
    let mut seen: Vec<String> = Vec::new();
    let columns: Vec<Column> = columns
        .into_iter()
        .map(|mut c| {
            let base = c.name().to_string();
            let mut name = base.clone();
            let mut n = 1;
            while seen.contains(&name) {
                n += 1;
                name = format!("{base}_{n}");
            }
            if name != base {
                c.rename(name.as_str().into());
            }
            seen.push(name);
            c
        })
        .collect();
    DataFrame::new(height, columns).unwrap_or_else(|_| DataFrame::empty())
}

fn strs(name: &str, values: Vec<String>) -> Column {
    Column::new(name.into(), values)
}

fn ints(name: &str, values: Vec<i64>) -> Column {
    Column::new(name.into(), values)
}

fn bools(name: &str, values: Vec<bool>) -> Column {
    Column::new(name.into(), values)
}

/// The text between the first `start` and the `end` after it.
fn between(text: &str, start: &str, end: &str) -> Option<String> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(text[from..from + len].to_string())
}

/// The items of the first SELECT list in `text`, split at top-level commas.
fn select_items(text: &str) -> Vec<String> {
    let Some(start) = text.find("SELECT ").map(|i| i + "SELECT ".len()) else {
        return Vec::new();
    };
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut quoted = false;
    let mut current = String::new();
    let rest = &text[start..];
    for (i, c) in rest.char_indices() {
        match c {
            '\'' | '"' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => depth -= 1,
            ',' if !quoted && depth == 0 => {
                items.push(current.trim().to_string());
                current.clear();
                continue;
            }
            ' ' if !quoted && depth == 0 && rest[i..].starts_with(" FROM ") => break,
            _ => {}
        }
        current.push(c);
    }
    if !current.trim().is_empty() {
        items.push(current.trim().to_string());
    }
    items
}

/// The column name of a select item: its alias, or the last part of a dotted name.
fn item_name(item: &str) -> String {
    for sep in [" as ", " AS "] {
        if let Some(i) = item.rfind(sep) {
            let alias = item[i + sep.len()..].trim();
            if !alias.contains(' ') || alias.starts_with('"') {
                return unquote(alias);
            }
        }
    }
    // A function call is named after the function, as PostgreSQL does.
    if item.ends_with(')')
        && !item.starts_with('(')
        && let Some(open) = item.find('(')
    {
        let function = item[..open].rsplit('.').next().unwrap_or("");
        if !function.is_empty() && function.chars().all(|c| c.is_alphanumeric() || c == '_') {
            return function.to_lowercase();
        }
    }
    match item.rsplit_once('.') {
        Some((_, last)) if last.chars().all(|c| c.is_alphanumeric() || c == '_') => {
            last.to_string()
        }
        _ if item.chars().all(|c| c.is_alphanumeric() || c == '_') => item.to_string(),
        _ => "?column?".to_string(),
    }
}

fn unquote(s: &str) -> String {
    let s = s.trim();
    match s.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) => inner.replace("\"\"", "\""),
        None => s.to_lowercase(),
    }
}

/// `name` as PostgreSQL's `quote_ident` prints it.
fn quote_ident(name: &str) -> String {
    let plain = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if plain {
        name.to_string()
    } else {
        format!("\"{}\"", name.replace('"', "\"\""))
    }
}

/// Whether `name` matches a psql pattern as psql sends it: `^(…)$` with `.*` for `*`, `.` for
/// `?`, and `\` before other special characters.
fn psql_match(pattern: &str, name: &str) -> bool {
    let p = pattern
        .strip_prefix("^(")
        .and_then(|p| p.strip_suffix(")$"))
        .unwrap_or(pattern);
    let mut tokens = Vec::new();
    let mut chars = p.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '.' if chars.peek() == Some(&'*') => {
                chars.next();
                tokens.push(None);
            }
            '.' => tokens.push(Some(None)),
            '\\' => tokens.push(Some(chars.next())),
            c => tokens.push(Some(Some(c))),
        }
    }
    glob(&tokens, &name.chars().collect::<Vec<_>>())
}

/// `None`: any run of characters; `Some(None)`: any one character; `Some(Some(c))`: `c`.
fn glob(tokens: &[Option<Option<char>>], name: &[char]) -> bool {
    match tokens.split_first() {
        None => name.is_empty(),
        Some((None, rest)) => (0..=name.len()).any(|i| glob(rest, &name[i..])),
        Some((Some(one), rest)) => match name.split_first() {
            Some((c, tail)) => one.is_none_or(|x| x == *c) && glob(rest, tail),
            None => false,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Catalog {
        Catalog::new(
            vec![(
                "web".into(),
                vec![
                    (
                        "pageviews".into(),
                        vec![
                            ("window_start".into(), Type::TIMESTAMPTZ),
                            ("page".into(), Type::TEXT),
                            ("views".into(), Type::INT8),
                        ],
                    ),
                    ("by_hour".into(), vec![("n".into(), Type::INT8)]),
                ],
            )],
            "lambda",
        )
    }

    #[test]
    fn psql_patterns_match_like_psql() {
        assert!(psql_match("^(web)$", "web"));
        assert!(!psql_match("^(web)$", "webx"));
        assert!(psql_match("^(.*)$", "anything"));
        assert!(psql_match("^(page.*)$", "pageviews"));
        assert!(psql_match("^(by.hour)$", "by_hour"));
        assert!(psql_match("^(by\\_hour)$", "by_hour"));
    }

    #[test]
    fn psql_dt_lists_the_views() {
        let q = "SELECT n.nspname as \"Schema\",\n  c.relname as \"Name\",\n  CASE c.relkind WHEN 'r' THEN 'table' END as \"Type\",\n  pg_catalog.pg_get_userbyid(c.relowner) as \"Owner\"\nFROM pg_catalog.pg_class c\n     LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace\nWHERE c.relkind IN ('r','p','t','s','')\n  AND n.nspname OPERATOR(pg_catalog.~) '^(web)$' COLLATE pg_catalog.default\nORDER BY 1,2;";
        let df = catalog().recognize(q).unwrap();
        let names: Vec<&str> = df.get_column_names().iter().map(|n| n.as_str()).collect();
        assert_eq!(names, ["Schema", "Name", "Type", "Owner"]);
        assert_eq!(df.height(), 2);
    }

    #[test]
    fn psql_d_describes_columns() {
        let c = catalog();
        let q = "SELECT a.attname,\n  pg_catalog.format_type(a.atttypid, a.atttypmod),\n  (SELECT pg_catalog.pg_get_expr(d.adbin, d.adrelid, true)\n   FROM pg_catalog.pg_attrdef d\n   WHERE d.adrelid = a.attrelid AND d.adnum = a.attnum AND a.atthasdef),\n  a.attnotnull\nFROM pg_catalog.pg_attribute a\nWHERE a.attrelid = '17000' AND a.attnum > 0 AND NOT a.attisdropped\nORDER BY a.attnum;";
        let df = c.recognize(q).unwrap();
        assert_eq!(df.width(), 4);
        assert_eq!(df.height(), 3);
        let types: Vec<Option<&str>> = df
            .column("format_type")
            .unwrap()
            .str()
            .unwrap()
            .iter()
            .collect();
        assert_eq!(
            types,
            [
                Some("timestamp with time zone"),
                Some("text"),
                Some("bigint")
            ]
        );
    }

    #[test]
    fn views_resolve_with_or_without_their_schema() {
        let c = catalog();
        assert_eq!(
            c.view(Some("web"), "pageviews"),
            Some(("web".into(), 0, "pageviews".into()))
        );
        assert_eq!(
            c.view(None, "by_hour"),
            Some(("web".into(), 1, "by_hour".into()))
        );
        assert_eq!(c.view(Some("other"), "pageviews"), None);
        assert_eq!(c.catalog(None, "pg_type"), Some("pg_catalog.pg_type"));
        assert_eq!(c.frame("information_schema.columns").unwrap().height(), 4);
    }
}
