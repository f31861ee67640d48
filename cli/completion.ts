/**
 * `engine completion bash`: a bash completion script generated from the program's own commands and options,
 * so it can never drift from what the CLI accepts. Sub-commands (`ovirt cleanup`) complete after their group;
 * anything that is neither a command nor an option completes as a file name (repositories, images, sockets).
 */
import type { Command } from 'commander';

interface CompletionNode {
  path: string;
  commands: string[];
  options: string[];
}

function nodes(command: Command, path: string): CompletionNode[] {
  const children = command.commands.filter((child) => child.name() !== 'help');
  const options = command.options.flatMap((option) => [option.long, option.short].filter((flag): flag is string => flag !== undefined));
  const own = { path, commands: children.map((child) => child.name()), options: [...new Set([...options, '--help'])] };
  return [own, ...children.flatMap((child) => nodes(child, path === '' ? child.name() : `${path} ${child.name()}`))];
}

export function bashCompletion(program: Command): string {
  const all = nodes(program, '');
  const known = all.filter(({ path }) => path !== '').map(({ path }) => `      '${path}') path='${path}' ;;`);
  const lists = all.map(({ path, commands, options }) => `    '${path}') commands='${commands.join(' ')}' options='${options.join(' ')}' ;;`);
  return `# bash completion for engine: engine completion bash > /etc/bash_completion.d/engine
_engine() {
  local cur=\${COMP_WORDS[COMP_CWORD]} path='' commands='' options='' i
  for ((i = 1; i < COMP_CWORD; i++)); do
    case "\${path:+$path }\${COMP_WORDS[i]}" in
${known.join('\n')}
    esac
  done
  case "$path" in
${lists.join('\n')}
  esac
  if [[ $cur == -* ]]; then
    COMPREPLY=($(compgen -W "$options" -- "$cur"))
  elif [[ -n $commands ]]; then
    COMPREPLY=($(compgen -W "$commands" -- "$cur"))
  else
    COMPREPLY=($(compgen -f -- "$cur"))
  fi
}
complete -o filenames -F _engine engine
`;
}
