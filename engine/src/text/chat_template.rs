//! Chat templates: the Jinja template in `tokenizer_config.json`, rendered as transformers does
//! (`trim_blocks`, `lstrip_blocks`, loop controls, Python string methods such as `.split()`
//! through minijinja-contrib's pycompat, and `raise_exception`).

use minijinja::{Environment, ErrorKind, context};

use crate::error::{EngineError, Result};

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    /// The roles chat templates understand.
    pub const ROLES: [&'static str; 4] = ["system", "user", "assistant", "tool"];

    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

const NAME: &str = "chat_template";

/// A compiled chat template and the special tokens it may refer to.
#[derive(Debug, Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl ChatTemplate {
    /// Compiles `source`; a syntax error is reported with minijinja's description.
    pub fn new(
        source: String,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let mut env = Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| EngineError::ChatTemplate(format!("template syntax config: {e}")))?;
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(NAME, source).map_err(|e| {
            EngineError::ChatTemplate(format!("the template does not compile: {e}"))
        })?;
        Ok(ChatTemplate {
            env,
            bos_token,
            eos_token,
        })
    }

    /// Renders a conversation. Roles are checked first, so an unknown role is the caller's error
    /// (with the message index), not a template failure.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        if messages.is_empty() {
            return Err(EngineError::InvalidInput(
                "chat.messages is empty (it needs at least one message)".into(),
            ));
        }
        for (i, m) in messages.iter().enumerate() {
            if !ChatMessage::ROLES.contains(&m.role.as_str()) {
                return Err(EngineError::InvalidInput(format!(
                    "chat.messages[{i}].role: unknown role {:?}; expected one of {}",
                    m.role,
                    ChatMessage::ROLES.join(", ")
                )));
            }
        }
        let tmpl = self
            .env
            .get_template(NAME)
            .map_err(|e| EngineError::ChatTemplate(e.to_string()))?;
        tmpl.render(context! {
            messages => minijinja::value::Serde(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|e| EngineError::ChatTemplate(format!("rendering failed: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_methods_and_raise_exception_work() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}{{ m.content.split('|')[-1] }}{% endfor %}".into(),
            None,
            None,
        )
        .expect("compiles");
        assert_eq!(
            t.render(&[ChatMessage::new("user", "a|b")], false)
                .expect("render"),
            "b"
        );
        let err = t
            .render(&[ChatMessage::new("tool", "x")], false)
            .expect_err("raises")
            .to_string();
        assert!(err.contains("no tools"), "{err}");
    }

    #[test]
    fn unknown_role_names_the_message_and_role() {
        let t =
            ChatTemplate::new("{{ messages[0].content }}".into(), None, None).expect("compiles");
        let msgs = [
            ChatMessage::new("user", "hi"),
            ChatMessage::new("wizard", "x"),
        ];
        let err = t.render(&msgs, true).expect_err("bad role").to_string();
        assert!(
            err.contains("chat.messages[1].role") && err.contains("\"wizard\""),
            "{err}"
        );
    }

    #[test]
    fn syntax_errors_are_reported_at_load() {
        let err = ChatTemplate::new("{% if %}".into(), None, None)
            .expect_err("bad syntax")
            .to_string();
        assert!(err.contains("does not compile"), "{err}");
    }
}
