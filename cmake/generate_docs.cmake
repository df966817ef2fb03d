# Writes a tool's man page and bash completion from its --help text, so neither can drift from it.
#   cmake -DTOOL=path -DNAME=lora-x -DVERSION=1.2.3 -DMAN=out.1 -DCOMPLETION=out -P generate_docs.cmake
execute_process(COMMAND ${TOOL} --help OUTPUT_VARIABLE help RESULT_VARIABLE status)
if(NOT status EQUAL 0)
  message(FATAL_ERROR "${TOOL} --help failed (${status})")
endif()

# NAME line: the description's first clause (up to a colon, parenthesis or full stop).
string(REGEX REPLACE "\n.*" "" summary "${help}")
string(REGEX REPLACE "(:| \\(|\\. ).*" "" summary "${summary}")
string(REGEX REPLACE "[.:]$" "" summary "${summary}")

# roff: backslashes escaped, lines starting with . or ' protected.
string(REPLACE "\\" "\\e" body "${help}")
string(REGEX REPLACE "(^|\n)([.'])" "\\1\\\\&\\2" body "${body}")
string(TOUPPER "${NAME}" upper)
file(WRITE ${MAN} ".TH ${upper} 1 \"\" \"lorakit ${VERSION}\" \"User Commands\"\n"
                  ".SH NAME\n${NAME} \\- ${summary}\n"
                  ".SH DESCRIPTION\n.nf\n${body}.fi\n"
                  ".SH SEE ALSO\nThe lorakit README (conventions, thresholds, exit codes).\n")

# Completion: the options the help's option list declares (lines starting with -x or --xx,
# possibly "-o,--output"); files otherwise.
string(REGEX MATCHALL "\n +-[-A-Za-z0-9,]+" found "${help}")
set(options "")
foreach(o ${found})
  string(REGEX REPLACE "^\n +" "" o "${o}")
  string(REPLACE "," ";" parts "${o}")
  list(APPEND options ${parts})
endforeach()
list(REMOVE_DUPLICATES options)
list(SORT options)
string(REPLACE ";" " " options "${options}")
string(REPLACE "-" "_" function "_${NAME}")
file(WRITE ${COMPLETION} "# bash completion for ${NAME} (generated from ${NAME} --help)\n"
  "${function}() {\n"
  "    local cur=\"\${COMP_WORDS[COMP_CWORD]}\"\n"
  "    if [[ \"$cur\" == -* ]]; then\n"
  "        COMPREPLY=($(compgen -W \"${options}\" -- \"$cur\"))\n"
  "    else\n"
  "        COMPREPLY=($(compgen -f -- \"$cur\"))\n"
  "    fi\n"
  "}\n"
  "complete -o filenames -F ${function} ${NAME}\n")
