//! Multi-document YAML in and out, with every problem located by document.

use serde_yaml_ng::Value;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum YamlError {
    #[error("document {doc}: not YAML: {reason}")]
    Parse { doc: usize, reason: String },
    #[error("output: {0}")]
    Emit(String),
}

/// Every document of `text`, in order; empty documents (a stray `---`,
/// comments only) are dropped. Nothing is returned unless all parse.
pub fn parse_documents(text: &str) -> Result<Vec<Value>, YamlError> {
    let mut docs = Vec::new();
    for (i, de) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let v = <Value as serde::Deserialize>::deserialize(de).map_err(|e| YamlError::Parse {
            doc: i + 1,
            reason: e.to_string(),
        })?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Documents joined with `---`, each as `serde_yaml_ng` writes it.
pub fn to_documents(docs: &[Value]) -> Result<String, YamlError> {
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(d).map_err(|e| YamlError::Emit(e.to_string()))?);
    }
    Ok(out)
}
