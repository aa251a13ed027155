"""JSON schema → the schema llguidance enforces.

llguidance compiles most of JSON Schema lazily; this pass does three things before it:

* **Bounds** (`Bounds`): a weak or random model must be able to close its JSON within
  max_tokens, so strings, arrays, free-form objects, integers and nesting of free values get
  a finite size where the schema sets none. Each bound only narrows the valid documents.
* **Rewrites** of keywords llguidance does not implement, each into an exact equivalent or a
  sound subset (every output still validates): dependentRequired / dependentSchemas (exact),
  propertyNames (exact for pattern / enum / const / lengths), contains (its items come first),
  uniqueItems (at most one item), `not` (required / type / const / enum forms), oneOf (as
  anyOf when its branches provably exclude each other), formats llguidance lacks.
* **Refusals** (`UnsupportedSchema`, a 400 naming the keyword) of what cannot be guaranteed,
  and of sizes (minItems 10^6) whose grammar alone would exhaust the replica (`max_count`).
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass
from typing import Any


class UnsupportedSchema(ValueError):
    """The schema uses `keyword` in a way raydock cannot enforce."""

    def __init__(self, keyword: str, message: str):
        super().__init__(message)
        self.keyword = keyword


class BoundExceeded(UnsupportedSchema):
    """A size in the schema is above a configured bound (`Bounds.max_count`)."""


@dataclass(frozen=True)
class Bounds:
    """Sizes used where the schema sets none, and hard caps."""

    max_string: int = 48  # characters when no maxLength (added to minLength)
    max_items: int = 6  # array items when no maxItems (added to minItems)
    max_free_keys: int = 4  # keys of a free-form object
    max_free_string: int = 16  # characters of keys and strings inside a free-form value
    max_free_depth: int = 2  # containers deep inside a free-form value
    max_int: int = 10**12 - 1  # |integer| when the schema sets no bound
    # any count (minItems, maxItems, min/maxProperties, min/maxContains) above this is
    # refused (min*) or capped (max*): llguidance expands counts into grammar rules
    max_count: int = 10_000
    # None: compact JSON (no whitespace); else the regex of the whitespace allowed between
    # tokens, e.g. r"[ ]?" (keep it bounded)
    whitespace: str | None = None

    @classmethod
    def from_env(cls) -> Bounds:
        """Defaults, overridden by RAYDOCK_GUIDED_BOUNDS (a JSON object of fields)."""
        return cls(**json.loads(os.environ.get("RAYDOCK_GUIDED_BOUNDS") or "{}"))


_ANNOTATIONS = (
    "title",
    "description",
    "examples",
    "default",
    "deprecated",
    "readOnly",
    "writeOnly",
    "$comment",
    "$id",
    "$schema",
    "$anchor",
    "$dynamicAnchor",
    "$vocabulary",
    "contentEncoding",
    "contentMediaType",
    "contentSchema",
    "discriminator",  # OpenAPI annotation
    "nullable",  # OpenAPI 3.0; handled below
)
_REFUSED = {
    "if": "if/then/else cannot be enforced",
    "unevaluatedProperties": "unevaluatedProperties cannot be enforced",
    "unevaluatedItems": "unevaluatedItems cannot be enforced",
    "$dynamicRef": "$dynamicRef cannot be enforced",
}
_COUNTS = ("minItems", "maxItems", "minProperties", "maxProperties", "minContains", "maxContains")

# formats llguidance lacks, or writes more loosely than jsonschema checks them (leap second
# 60, a lower-case "t", 31 February) → a sound replacement (a subset of the format's strings)
_DAY = "(0[1-9]|1[0-9]|2[0-8])"  # 29-31 left out so every date exists
_DATE = rf"(19|20)[0-9]{{2}}-(0[1-9]|1[0-2])-{_DAY}"
_HOUR = "([01][0-9]|2[0-3])"
_TIME = rf"{_HOUR}:[0-5][0-9]:[0-5][0-9](\.[0-9]{{1,6}})?(Z|[+-]{_HOUR}:[0-5][0-9])"
_JSON_POINTER = r"^(/([^~/]|~[01]){0,24}){0,6}$"
_FORMAT_SUBSETS: dict[str, dict[str, Any]] = {
    "date": {"pattern": f"^{_DATE}$"},
    "time": {"pattern": f"^{_TIME}$"},
    "date-time": {"pattern": f"^{_DATE}T{_TIME}$"},
    "uri-reference": {"format": "uri"},
    "iri": {"format": "uri"},
    "iri-reference": {"format": "uri"},
    "idn-email": {"format": "email"},
    "idn-hostname": {"format": "hostname"},
    "json-pointer": {"pattern": _JSON_POINTER},
    "relative-json-pointer": {"pattern": r"^(0|[1-9][0-9]{0,3})$"},
    "regex": {"pattern": r"^[A-Za-z0-9 _-]*$"},
    "uri-template": {"pattern": r"^[A-Za-z0-9:/._-]*$"},
}
_KNOWN_FORMATS = {
    "duration",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "uuid",
    "uri",
}


def _check_pattern(pattern: Any, keyword: str) -> None:
    """Refuse, naming the keyword, a pattern outside the Rust regex dialect llguidance reads
    (look-arounds, backreferences): cheap, and before the replica sees it."""
    import llguidance

    if not isinstance(pattern, str):
        raise UnsupportedSchema(keyword, f"{keyword} must be a string")
    if error := llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("regex", pattern)):
        raise UnsupportedSchema(
            keyword,
            f"{keyword} {pattern!r} is outside the regex dialect raydock enforces (no "
            f"look-arounds or backreferences): {' '.join(error.split())[:200]}",
        )


def _json_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "integer" if v.is_integer() else "number"
    return {str: "string", type(None): "null", list: "array", dict: "object"}[type(v)]


def _type_set(s: Any) -> set[str] | None:
    t = s.get("type") if isinstance(s, dict) else None
    if t is None:
        return None
    names = {t} if isinstance(t, str) else set(t)
    if "number" in names:
        names.add("integer")
    return names


def _values(s: Any) -> list | None:
    if not isinstance(s, dict):
        return None
    if "const" in s:
        return [s["const"]]
    if isinstance(s.get("enum"), list):
        return s["enum"]
    return None


def resolve_ref(s: Any, root: Any, hops: int = 8) -> Any:
    """`s`, or what its local `$ref` (`#/...`, JSON pointer escapes read) names in `root`,
    following up to `hops` references; a reference that names nothing there stays."""
    for _ in range(hops):
        if not (isinstance(s, dict) and isinstance(s.get("$ref"), str)):
            return s
        ref = s["$ref"]
        if not ref.startswith("#"):
            return s
        node = root
        for part in filter(None, ref[1:].split("/")):
            part = part.replace("~1", "/").replace("~0", "~")
            if not isinstance(node, dict) or part not in node:
                return s
            node = node[part]
        s = node
    return s


def _only_references(s: dict[str, Any], root: Any) -> bool:
    """Whether `s` is a reference whose chain (of schemas that are only a `$ref`) comes back
    to itself, never reaching a schema that says what a value is."""
    seen: set[str] = set()
    while isinstance(s, dict) and set(s) == {"$ref"} and isinstance(s["$ref"], str):
        if s["$ref"] in seen:
            return True
        seen.add(s["$ref"])
        target = resolve_ref(s, root, hops=1)
        if target is s:  # names nothing there: llguidance says so
            return False
        s = target
    return False


# allOf branches merged in one schema: each is a deep copy, and $defs whose allOf names
# another $def k times made k**depth of them (a 50-value schema took minutes)
MAX_ALL_OF_MERGES = 1_000
# seconds to match propertyNames' pattern against a schema's declared names (Python's re
# backtracks: "^(a+)+$" on 40 characters took hours, holding the GIL)
NAME_PATTERN_BUDGET_S = 0.5


class _Normalizer:
    def __init__(self, root: Any, bounds: Bounds):
        self.root = root
        self.bounds = bounds
        self.merges = 0

    def resolve(self, s: Any) -> Any:
        """Follow local $refs (a few hops) for the exclusivity check."""
        return resolve_ref(s, self.root)

    def exclusive(self, a: Any, b: Any, objects: bool = False, depth: int = 0) -> bool:
        """True when no value satisfies both schemas (as far as can be shown cheaply).
        `objects`: the enclosing schema admits only objects."""
        a, b = self.resolve(a), self.resolve(b)
        va, vb = _values(a), _values(b)
        if va is not None and vb is not None:
            return not any(x == y and type(x) is type(y) for x in va for y in vb)
        ta, tb = _type_set(a), _type_set(b)
        if ta is not None and tb is not None and not ta & tb:
            return True
        for values, types in ((va, tb), (vb, ta)):  # constants of types the other excludes
            if (
                values is not None
                and types is not None
                and not any(_json_type(v) in types for v in values)
            ):
                return True
        if depth > 3 or not (isinstance(a, dict) and isinstance(b, dict)):
            return False
        # told apart by a discriminator property: only among objects, since properties and
        # required say nothing about other values (which would then satisfy both)
        if not (objects or (ta == {"object"} and tb == {"object"})):
            return False
        pa, pb = a.get("properties", {}), b.get("properties", {})
        common = set(a.get("required", [])) & set(b.get("required", []))
        return any(
            n in pa and n in pb and self.exclusive(pa[n], pb[n], depth=depth + 1) for n in common
        )

    # ---------------------------------------------------------------------------- walk

    def node(self, s: Any, depth: int = 0) -> Any:
        """A normalized copy of schema `s`."""
        if s is True or s == {}:
            return self.free_value(self.bounds.max_free_depth)
        if not isinstance(s, dict):
            return s
        s = dict(s)
        for k in _ANNOTATIONS:
            if k == "nullable" and s.get("nullable") is True and isinstance(s.get("type"), str):
                s["type"] = [s["type"], "null"]
            s.pop(k, None)
        for k, why in _REFUSED.items():
            if k in s:
                raise UnsupportedSchema(k, why)
        if isinstance(s.get("$ref"), str) and not s["$ref"].startswith("#"):
            raise UnsupportedSchema(
                "$ref", f"only local '#/...' references are resolved, not {s['$ref']!r}"
            )
        if _only_references(s, self.root):
            raise UnsupportedSchema(
                "$ref",
                f"{s['$ref']!r} leads only to references, back to itself: no value satisfies it",
            )
        if "pattern" in s:
            _check_pattern(s["pattern"], "pattern")
        for key in s.get("patternProperties") or {}:
            _check_pattern(key, "patternProperties")
        if "then" in s or "else" in s:
            s.pop("then", None), s.pop("else", None)  # without `if` they mean nothing
        for k in _COUNTS:
            if k in s and isinstance(s[k], int) and s[k] > self.bounds.max_count:
                if k.startswith("min"):
                    raise BoundExceeded(
                        k,
                        f"{k} {s[k]} is above the limit of {self.bounds.max_count} "
                        "(the guided-decoding bound max_count)",
                    )
                s[k] = self.bounds.max_count
        for key in ("$defs", "definitions"):
            if isinstance(s.get(key), dict):
                s[key] = {n: self.node(d, depth) for n, d in s[key].items()}
        if isinstance(s.get("allOf"), list):
            self.flatten_all_of(s)
        if "not" in s:
            self.rewrite_not(s, s.pop("not"))
        if "oneOf" in s:
            branches = s.pop("oneOf")
            for i in range(len(branches)):
                for j in range(i + 1, len(branches)):
                    objects = _type_set(s) == {"object"}
                    if not self.exclusive(branches[i], branches[j], objects):
                        raise UnsupportedSchema(
                            "oneOf",
                            f"oneOf branches {i} and {j} may both match one value, so "
                            "'exactly one' cannot be enforced; use anyOf",
                        )
            if "anyOf" in s:  # anyOf and oneOf: both must hold
                s["allOf"] = [*s.get("allOf", []), {"anyOf": branches}]
            else:
                s["anyOf"] = branches
        for key in ("anyOf", "allOf"):
            if isinstance(s.get(key), list):
                s[key] = [self.node(b, depth) for b in s[key]]
        if "format" in s:
            self.rewrite_format(s)
        types = _type_set(s)
        if _values(s) is not None or "$ref" in s:
            pass
        else:
            if types is None or "string" in types:
                self.string(s, types is not None)
            if types is None or "integer" in types or "number" in types:
                self.number(s, types is not None)
            if types is None or "array" in types:
                self.array(s, depth, types is not None)
            if types is None or "object" in types:
                self.object(s, depth, types is not None)
        return s

    _FLAT = frozenset({"type", "properties", "required", "allOf", *_ANNOTATIONS})

    def flatten_all_of(self, s: dict, hops: int = 0) -> None:
        """Merge allOf branches that only declare object properties (OpenAPI's
        `allOf: [{$ref: Base}, {properties: ...}]`) into `s`: exact, and it lets `object` close
        the merged object (closing each branch would forbid the other branches' keys)."""
        rest = []
        for branch in s.pop("allOf"):
            pure_ref = isinstance(branch, dict) and set(branch) == {"$ref"}
            r = self.resolve(branch) if pure_ref else branch
            if not isinstance(r, dict) or not set(r) <= self._FLAT or hops > 8:
                rest.append(branch)
                continue
            self.merges += 1
            if self.merges > MAX_ALL_OF_MERGES:
                raise BoundExceeded(
                    "allOf",
                    f"the schema's allOf branches merge into more than {MAX_ALL_OF_MERGES} "
                    "(allOf over $refs that hold allOf again): flatten it",
                )
            r = copy.deepcopy(r)
            if isinstance(r.get("allOf"), list):
                self.flatten_all_of(r, hops + 1)
                if "allOf" in r:
                    rest.append(branch)
                    continue
            if "type" in r and s.get("type", r["type"]) != r["type"]:
                rest.append(branch)
                continue
            if "type" in r:
                s["type"] = r["type"]
            props = s.setdefault("properties", {})
            for name, sub in (r.get("properties") or {}).items():
                props[name] = {"allOf": [props[name], sub]} if name in props else sub
            for name in r.get("required", []):
                if name not in s.setdefault("required", []):
                    s["required"].append(name)
        if rest:
            s["allOf"] = rest

    def free_value(self, depth: int) -> dict[str, Any]:
        """Any JSON value, bounded in size and depth."""
        scalars: list[Any] = [
            {"type": ["null", "boolean"]},
            {"type": "integer", "minimum": -self.bounds.max_int, "maximum": self.bounds.max_int},
            {"type": "string", "maxLength": self.bounds.max_free_string},
        ]
        if depth <= 0:
            return {"anyOf": scalars}
        inner = self.free_value(depth - 1)
        return {
            "anyOf": [
                *scalars,
                {"type": "array", "items": inner, "maxItems": self.bounds.max_items},
                {
                    "type": "object",
                    # keys of bounded length
                    "patternProperties": {f"^.{{0,{self.bounds.max_free_string}}}$": inner},
                    "additionalProperties": False,
                    "maxProperties": self.bounds.max_free_keys,
                },
            ]
        }

    def rewrite_not(self, s: dict, neg: Any) -> None:
        """Sound forms of `not`: absent properties, excluded types, excluded constants."""
        if isinstance(neg, dict) and set(neg) == {"required"} and len(neg["required"]) == 1:
            props = s.setdefault("properties", {})
            (name,) = neg["required"]
            if name in s.get("required", []):
                raise UnsupportedSchema("not", f"'{name}' is both required and forbidden")
            props[name] = False
            return
        if isinstance(neg, dict) and set(neg) == {"anyOf"}:
            for branch in neg["anyOf"]:  # not (A or B) = not A and not B
                self.rewrite_not(s, branch)
            return
        if isinstance(neg, dict) and set(neg) == {"type"}:
            all_types = ["null", "boolean", "object", "array", "number", "string"]
            banned = {neg["type"]} if isinstance(neg["type"], str) else set(neg["type"])
            have = s.get("type")
            keep = ([have] if isinstance(have, str) else list(have)) if have else all_types
            keep = [t for t in keep if t not in banned]
            if "integer" in banned and "number" in keep:
                raise UnsupportedSchema("not", "not: integer inside number cannot be enforced")
            if not keep:
                raise UnsupportedSchema("not", "no type is left after 'not'")
            s["type"] = keep
            return
        values = _values(neg)
        if values is not None and set(neg) <= {"const", "enum"}:
            allowed = _values(s)
            if allowed is not None:  # an enum minus some values: exact
                rest = [v for v in allowed if v not in values]
                s.pop("const", None)
                s["enum"] = rest
                return
            if all(isinstance(v, str) for v in values) and _type_set(s) == {"string"}:
                # strings other than a few: exclude them by a pattern (exact for short lists)
                s["pattern"] = _not_strings_pattern(values, s.get("pattern"))
                return
        raise UnsupportedSchema(
            "not",
            "'not' is enforced only as not-required, not-type, not-const/enum (over an enum "
            "or strings); this form cannot be enforced",
        )

    def rewrite_format(self, s: dict) -> None:
        fmt = s["format"]
        if fmt in _KNOWN_FORMATS:
            return
        sub = _FORMAT_SUBSETS.get(fmt)
        del s["format"]
        if sub is None:
            return  # an unknown format is an annotation (JSON Schema 2020-12, and jsonschema)
        if "pattern" in sub and "pattern" in s:  # both must hold: llguidance intersects them
            s["allOf"] = [*s.get("allOf", []), {"type": "string", **sub}]
        else:
            s.update(sub)

    def string(self, s: dict, typed: bool) -> None:
        if "maxLength" not in s and (typed or "minLength" in s or "pattern" in s):
            s["maxLength"] = s.get("minLength", 0) + self.bounds.max_string

    def number(self, s: dict, typed: bool) -> None:
        if not typed:
            return
        if not any(k in s for k in ("minimum", "exclusiveMinimum")):
            s["minimum"] = -self.bounds.max_int
        if not any(k in s for k in ("maximum", "exclusiveMaximum")):
            s["maximum"] = self.bounds.max_int

    def array(self, s: dict, depth: int, typed: bool) -> None:
        if not typed and not any(k in s for k in ("items", "prefixItems", "contains")):
            return
        for key in ("items", "additionalItems"):
            if isinstance(s.get(key), list):  # draft 4-7 tuple form
                s["prefixItems"] = s.pop(key)
                key = "prefixItems"
            if key in s and not isinstance(s[key], list):
                s[key] = self.node(s[key], depth + 1)
        if isinstance(s.get("prefixItems"), list):
            s["prefixItems"] = [self.node(x, depth + 1) for x in s["prefixItems"]]
        lo = s.get("minItems", 0)
        if "contains" in s:
            self.contains(s, depth)
            lo = s.get("minItems", 0)
        if s.pop("uniqueItems", False) is True and s.get("maxItems", 2) > 1:
            # sound subset: an array of at most one item has no duplicates
            if lo > 1 or len(s.get("prefixItems", [])) > 1:
                raise UnsupportedSchema(
                    "uniqueItems",
                    "uniqueItems with more than one required item cannot be enforced",
                )
            s["maxItems"] = 1
        if "maxItems" not in s:
            s["maxItems"] = max(lo, len(s.get("prefixItems", []))) + self.bounds.max_items

    def contains(self, s: dict, depth: int) -> None:
        """Sound subset: the first minContains (default 1) items match `contains`."""
        if "maxContains" in s:
            raise UnsupportedSchema("maxContains", "maxContains cannot be enforced")
        need = s.pop("minContains", 1)
        c = self.node(s.pop("contains"), depth + 1)
        if need == 0:
            return
        if s.get("prefixItems"):
            raise UnsupportedSchema("contains", "contains together with prefixItems")
        item = s.get("items", True)
        first = c if item is True or item == {} else {"allOf": [item, c]}
        s["prefixItems"] = [first] * need
        s["minItems"] = max(s.get("minItems", 0), need)

    def object(self, s: dict, depth: int, typed: bool) -> None:
        props = s.get("properties")
        if isinstance(props, dict):
            s["properties"] = {
                n: p if p is False else self.node(p, depth + 1) for n, p in props.items()
            }
        if isinstance(s.get("patternProperties"), dict):
            s["patternProperties"] = {
                k: self.node(p, depth + 1) for k, p in s["patternProperties"].items()
            }
        if "dependentRequired" in s or "dependencies" in s or "dependentSchemas" in s:
            self.dependencies(s, depth)
        if "propertyNames" in s:
            self.property_names(s, s.pop("propertyNames"), depth)
        if not typed and not any(
            k in s for k in ("properties", "patternProperties", "additionalProperties", "required")
        ):
            return
        extra = s.get("additionalProperties", True)
        closed = extra is False  # by the schema itself
        declared = set(s.get("properties", {}))
        required = s.get("required", [])
        free = self.free_value(self.bounds.max_free_depth - 1)
        if extra is True or extra == {}:
            if declared or s.get("patternProperties"):
                # sound subset: only the declared keys (a weak model invents keys), unless
                # minProperties asks for more
                extra = free if s.get("minProperties", 0) > len(declared) else False
            else:
                extra = free
        elif isinstance(extra, dict):
            extra = self.node(extra, depth + 1)
        if extra is not False:
            room = max(s.get("minProperties", 0), len(declared | set(required)))
            s["maxProperties"] = min(
                s.get("maxProperties", room + self.bounds.max_free_keys),
                room + self.bounds.max_free_keys,
            )
        if extra is not False and not declared and not required and not s.get("patternProperties"):
            # a map of free keys (json_object, labels): bound the keys' length too, or a weak
            # model writes one key until max_tokens (a sound subset)
            s["patternProperties"] = {f"^.{{0,{self.bounds.max_free_string}}}$": extra}
            extra = False
        for name in required:  # required but not declared: its schema is the extra one
            if name not in declared:
                if closed:
                    raise UnsupportedSchema(
                        "required", f"'{name}' is required but additionalProperties is false"
                    )
                s.setdefault("properties", {})[name] = free if extra is False else extra
        s["additionalProperties"] = extra

    def dependencies(self, s: dict, depth: int) -> None:
        """dependentRequired / dependentSchemas (and draft-7 `dependencies`) as
        anyOf[key absent, key present with its dependents]: exact."""
        req = dict(s.pop("dependentRequired", {}))
        schemas = dict(s.pop("dependentSchemas", {}))
        for k, v in s.pop("dependencies", {}).items():
            (req if isinstance(v, list) else schemas)[k] = v
        groups = []
        for key in sorted(set(req) | set(schemas)):
            present: dict[str, Any] = {"required": [key, *req.get(key, [])]}
            if key in schemas:
                present = {"allOf": [present, self.node(schemas[key], depth)]}
            groups.append({"anyOf": [{"properties": {key: False}}, present]})
        s["allOf"] = [*s.get("allOf", []), *groups]

    def property_names(self, s: dict, names: Any, depth: int) -> None:
        """propertyNames: declared properties it rejects are dropped; other keys follow
        additionalProperties under a pattern (exact for pattern / enum / const / lengths)."""
        if names is True or names == {}:
            return
        if not isinstance(names, dict) or not set(names) <= {
            "pattern",
            "enum",
            "const",
            "minLength",
            "maxLength",
            "type",
        }:
            raise UnsupportedSchema(
                "propertyNames", "propertyNames is enforced for pattern, enum, const and lengths"
            )
        values = _values(names)
        if values is not None:
            keys = [v for v in values if isinstance(v, str)]
            rx = "^(" + "|".join(re.escape(k) for k in keys) + ")$" if keys else "^(?!)$"
            ok = set(keys).__contains__
        elif "pattern" in names:
            rx = names["pattern"]
            if "minLength" in names or "maxLength" in names:
                raise UnsupportedSchema("propertyNames", "propertyNames pattern with lengths")
            _check_pattern(rx, "propertyNames.pattern")
            ok = _name_matcher(rx)
        else:
            lo, hi = _name_lengths(names, self.bounds)
            rx = f"^.{{{lo},{hi}}}$"

            def ok(name: str) -> bool:
                return lo <= len(name) <= hi

        props = s.get("properties", {})
        for name in list(props):
            if not ok(name):
                if name in s.get("required", []):
                    raise UnsupportedSchema(
                        "propertyNames", f"required '{name}' is not allowed by propertyNames"
                    )
                props[name] = False
        extra = s.get("additionalProperties", True)
        if s.get("patternProperties"):
            raise UnsupportedSchema("propertyNames", "propertyNames with patternProperties")
        if extra is not False:
            value = self.free_value(self.bounds.max_free_depth - 1) if extra is True else extra
            for name in s.get("required", []):  # required, undeclared: the extra schema
                if name not in props:
                    if not ok(name):
                        raise UnsupportedSchema(
                            "propertyNames", f"required '{name}' is not allowed by propertyNames"
                        )
                    s.setdefault("properties", props)[name] = value
            s["patternProperties"] = {rx: value}
            s["additionalProperties"] = False
            s.setdefault("maxProperties", len(props) + self.bounds.max_free_keys)


def _name_lengths(names: dict, bounds: Bounds) -> tuple[int, int]:
    lo, hi = names.get("minLength", 0), names.get("maxLength", bounds.max_string)
    for key, value in (("minLength", lo), ("maxLength", hi)):
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= bounds.max_count
        ):
            raise UnsupportedSchema(
                "propertyNames",
                f"propertyNames {key} must be a whole number from 0 to {bounds.max_count}",
            )
    if lo > hi:
        raise UnsupportedSchema(
            "propertyNames", f"propertyNames minLength {lo} is above its maxLength {hi}"
        )
    return lo, hi


def _name_matcher(rx: str):
    """Whether a declared property name matches propertyNames' pattern (a regex search, as
    JSON Schema's), within NAME_PATTERN_BUDGET_S for the whole schema: matched with the regex
    module, whose matches time out, and which reads the \\p{..} classes of the Rust dialect."""
    import time

    import regex

    try:
        compiled = regex.compile(rx)
    except regex.error as exc:
        raise UnsupportedSchema(
            "propertyNames", f"propertyNames pattern {rx!r} cannot be read: {exc}"
        ) from None
    end = time.monotonic() + NAME_PATTERN_BUDGET_S

    def ok(name: str) -> bool:
        try:
            return compiled.search(name, timeout=max(0.0, end - time.monotonic())) is not None
        except TimeoutError:
            raise UnsupportedSchema(
                "propertyNames",
                f"propertyNames pattern {rx!r} is too slow to match the declared property "
                "names (nested repeats such as (a+)+): use a simpler pattern",
            ) from None

    return ok


def _not_strings_pattern(values: list[str], pattern: str | None) -> str:
    if pattern is not None or len(values) > 8 or any(len(v) > 32 for v in values):
        raise UnsupportedSchema("not", "'not' over many or long strings cannot be enforced")
    # a string differs from each excluded value: a different length or a different char;
    # expressed without look-arounds as: any string whose length is not one of them, or of
    # that length and not equal. Simple and exact for a handful of values:
    alts = []
    lengths = sorted({len(v) for v in values})
    alts.append("(?:" + "|".join(_length_not_in(lengths)) + ")")
    for n in lengths:
        same = [v for v in values if len(v) == n]
        alts.append(_same_length_not(same, n))
    return "^(?:" + "|".join(a for a in alts if a) + ")$"


def _length_not_in(lengths: list[int]) -> list[str]:
    out, prev = [], -1
    for n in lengths:
        if n - prev > 1:
            out.append(f"[\\s\\S]{{{prev + 1},{n - 1}}}")
        prev = n
    out.append(f"[\\s\\S]{{{prev + 1},}}")
    return out


def _same_length_not(values: list[str], n: int) -> str:
    """Strings of length n equal to none of `values` (a trie walk: first difference)."""
    if n == 0:
        return ""
    alts = []

    def walk(prefix: str, group: list[str]) -> None:
        i = len(prefix)
        if i == n:
            return
        firsts = sorted({v[i] for v in group})
        cls = "".join(re.escape(c) for c in firsts)
        rest = n - i - 1
        alts.append(re.escape(prefix) + f"[^{cls}]" + (f"[\\s\\S]{{{rest}}}" if rest else ""))
        for c in firsts:
            walk(prefix + c, [v for v in group if v[i] == c])

    walk("", values)
    return "|".join(alts)


def normalize(schema: Any, bounds: Bounds | None = None) -> dict[str, Any]:
    """The schema llguidance gets (with raydock's whitespace in `x-guidance`); raises
    UnsupportedSchema naming the keyword that cannot be enforced."""
    bounds = bounds if bounds is not None else _BOUNDS
    if schema is False:
        raise UnsupportedSchema("false", "the schema 'false' accepts no value")
    if not isinstance(schema, dict | bool):
        raise UnsupportedSchema("schema", "a JSON schema is an object or a boolean")
    out = _Normalizer(copy.deepcopy(schema), bounds).node(copy.deepcopy(schema))
    options: dict[str, Any] = {"whitespace_flexible": bounds.whitespace is not None}
    if bounds.whitespace is not None:
        options["whitespace_pattern"] = bounds.whitespace
    out["x-guidance"] = options
    return out


_BOUNDS = Bounds.from_env()
