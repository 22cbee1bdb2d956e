//! Rows read back from an outbox table with SQL (for `backfill` and `verify`): in a stable
//! order, in batches, all from one snapshot, every value in PostgreSQL's text output — as
//! pgoutput sends it — so the mapping treats them exactly as rows read from the WAL.
//!
//! The predicate (`--where`, `--initial-backfill`) is the user's SQL. It runs in a `READ ONLY`
//! transaction, and only ever inside one statement sent with the extended protocol, which takes
//! exactly one: a predicate can neither write nor end the transaction to run statements of its
//! own.

use super::SourceError;
use super::catalog::Catalog;
use super::error::{describe_sql_error, sql_error_is_transient};
use super::pgoutput::Relation;

/// Which rows, in which order.
#[derive(Debug, Clone)]
pub struct TableQuery {
    pub table: Relation,
    /// A SQL condition on the table's rows (`true` for all of them).
    pub predicate: String,
    /// Column names to order by, the most significant first (ascending).
    pub order_by: Vec<String>,
    /// An exported snapshot to read in (`pg_export_snapshot()`, or a replication slot's).
    pub snapshot: Option<String>,
}

/// One row: each column's text, or NULL.
pub type TextRow = Vec<Option<String>>;

/// How many rows the query selects, and the first and last of them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub rows: u64,
    pub first: Option<TextRow>,
    pub last: Option<TextRow>,
}

/// A cursor over the selected rows, in one repeatable-read transaction.
pub struct TableReader {
    client: tokio_postgres::Client,
    batch: usize,
}

/// `"name"`, with inner quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

impl TableQuery {
    fn source_clause(&self) -> String {
        format!(
            "FROM {}.{} WHERE ({})",
            quote_ident(&self.table.namespace),
            quote_ident(&self.table.name),
            self.predicate
        )
    }

    /// Every column, as text (its type's output function, as pgoutput sends it).
    fn columns(&self) -> String {
        self.table
            .columns
            .iter()
            .map(|c| format!("{}::text", quote_ident(&c.name)))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn order(&self, descending: bool) -> String {
        let direction = if descending { " DESC" } else { "" };
        self.order_by
            .iter()
            .map(|c| format!("{}{direction}", quote_ident(c)))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl TableReader {
    /// Opens a connection to the host `catalog` uses and a cursor for `query`; returns it with
    /// what the query selects (counted in the same snapshot).
    pub async fn open(
        catalog: &Catalog,
        query: &TableQuery,
        batch: usize,
    ) -> Result<(TableReader, Selection), SourceError> {
        let database = catalog.database();
        let (config, tls) = database.sql_config(catalog.host())?;
        let (client, connection) = database
            .within_connect_timeout(config.connect(tls))
            .await
            .map_err(|timeout| SourceError::Connect {
                target: database.to_string(),
                transient: true,
                detail: format!("{}: {timeout}", catalog.host()),
            })?
            .map_err(|err| SourceError::Connect {
                target: database.to_string(),
                transient: sql_error_is_transient(&err),
                detail: describe_sql_error(&err),
            })?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "backfill connection to PostgreSQL closed");
            }
        });
        let reader = TableReader {
            client,
            batch: batch.max(1),
        };
        let snapshot = match &query.snapshot {
            Some(name) => format!("SET TRANSACTION SNAPSHOT '{}';", name.replace('\'', "''")),
            None => String::new(),
        };
        reader
            .run(
                &format!(
                    "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; {snapshot}
                     SET LOCAL bytea_output = 'hex';"
                ),
                "starting the backfill's transaction",
            )
            .await?;
        let count = reader
            .rows(
                &format!("SELECT count(*)::text {}", query.source_clause()),
                "counting the rows to backfill",
            )
            .await?;
        let rows = count
            .first()
            .and_then(|row| row.first().cloned().flatten())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        let edge = |descending: bool| {
            format!(
                "SELECT {} {} ORDER BY {} LIMIT 1",
                query.columns(),
                query.source_clause(),
                query.order(descending)
            )
        };
        let first = reader
            .rows(&edge(false), "reading the first row to backfill")
            .await?
            .pop();
        let last = reader
            .rows(&edge(true), "reading the last row to backfill")
            .await?
            .pop();
        reader
            .client
            .execute(
                &format!(
                    "DECLARE outbox_backfill NO SCROLL CURSOR FOR SELECT {} {} ORDER BY {}",
                    query.columns(),
                    query.source_clause(),
                    query.order(false)
                ),
                &[],
            )
            .await
            .map_err(|e| SourceError::query("opening the backfill's cursor", e))?;
        Ok((reader, Selection { rows, first, last }))
    }

    /// The next rows in order; empty at the end.
    pub async fn next_batch(&mut self) -> Result<Vec<TextRow>, SourceError> {
        self.rows(
            &format!("FETCH {} FROM outbox_backfill", self.batch),
            "reading rows to backfill",
        )
        .await
    }

    /// Our own statements, without the user's SQL.
    async fn run(&self, sql: &str, context: &str) -> Result<(), SourceError> {
        self.client
            .batch_execute(sql)
            .await
            .map_err(|e| SourceError::query(context, e))
    }

    /// One statement (the extended protocol refuses more), every column text.
    async fn rows(&self, sql: &str, context: &str) -> Result<Vec<TextRow>, SourceError> {
        let rows = self
            .client
            .query(sql, &[])
            .await
            .map_err(|e| SourceError::query(context, e))?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| row.try_get::<_, Option<String>>(i))
                    .collect::<Result<TextRow, _>>()
                    .map_err(|e| SourceError::query(context, e))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::pgoutput::RelationColumn;

    #[test]
    fn quotes_names_and_builds_the_query() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        let query = TableQuery {
            table: Relation {
                id: 1,
                namespace: "app".into(),
                name: "Outbox".into(),
                columns: ["id", "created_at"]
                    .iter()
                    .map(|n| RelationColumn {
                        name: n.to_string(),
                        type_oid: 25,
                        flags: 0,
                    })
                    .collect(),
            },
            predicate: "published_at IS NULL".into(),
            order_by: vec!["created_at".into(), "id".into()],
            snapshot: None,
        };
        assert_eq!(
            query.source_clause(),
            "FROM \"app\".\"Outbox\" WHERE (published_at IS NULL)"
        );
        assert_eq!(query.columns(), "\"id\"::text, \"created_at\"::text");
        assert_eq!(query.order(true), "\"created_at\" DESC, \"id\" DESC");
    }
}
